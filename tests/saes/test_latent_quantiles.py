"""`base.latent_quantiles`: each latent's value above which lie its share l0 / d_sae of the tokens, the same
as a column-wise kthvalue of the plain pre-activations, for any width (chunks of 512 latents, a partial last
one) and with the default bias or a given one."""

import torch

from helpers.saes.base import latent_quantiles
from helpers.saes.standard import StandardSAE


def test_latent_quantiles_is_the_plain_kthvalue():
    g = torch.Generator().manual_seed(0)
    d_in, d_sae, n, l0 = 24, 700, 3000, 35.0
    sae = StandardSAE(d_in, d_sae, l0=l0)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(d_in, generator=g))
        sae.b_enc.copy_(torch.randn(d_sae, generator=g))
    x = torch.randn(n, d_in, generator=g) * 2 + 1
    above = round(n * l0 / d_sae)  # 150 tokens above each latent's value
    for bias in (None, torch.randn(d_sae, generator=g)):
        with torch.no_grad():
            got = latent_quantiles(sae, x, l0, bias)
            pre = (x - sae.b_dec) @ sae.W_enc_T.t() + (sae.b_enc if bias is None else bias)  # [n, d_sae]
        torch.testing.assert_close(got, pre.kthvalue(n - above, dim=0).values, rtol=1e-5, atol=1e-5)
        # the exact share above, on the values as computed here (ties aside: continuous data)
        assert abs(float((pre > got).sum(0).float().mean()) - above) < 1.0
