"""Our own model class for nanochat's 2026 layouts, which transformers' `NanoChatForCausalLM` cannot hold.

nanochat's `GPT` gained, in 2026 (table in `nanochat_layouts.py`): per-layer `resid_lambdas` / `x0_lambdas`,
sliding-window attention, value embeddings mixed into the values (per-head gates on alternating layers),
a q/k scale after QK-norm, a previous-token "smear" and a mid-layer "backout". `NanoChatGPTForCausalLM`
computes exactly what upstream's `GPT.forward` computes for each of those layouts (checked against
upstream's own code in tests/model/test_nanochat_gpt.py), with the interface the rest of this package
uses on every transformers causal LM:

- `model(input_ids, attention_mask=, position_ids=, past_key_values=DynamicCache, use_cache=,
  logits_to_keep=)` returning `.logits` [batch, seq, vocab] (float32, vocabulary padding cropped, softcapped
  as upstream), so batched KV-cached sampling (`collect.sampling`), padded capture and the LM-loss
  evaluation run unchanged;
- padding: positions count real tokens only (derived from `attention_mask` when `position_ids` is not
  given), padded keys are masked, so a left- or right-padded row computes what the unpadded sequence
  does; sliding windows are an SDPA boolean mask (no FlashAttention needed, so a T4 runs it);
- `.config` (a transformers `PretrainedConfig`), `.device`, `.dtype`, `save_pretrained` /
  `AutoModelForCausalLM.from_pretrained` (the classes are registered with the Auto classes on import).

Where the hook points sit (`hooks`: `blocks.{i}.hook_resid_post` = the output of `transformer.h[i]`):

    x0 = smear(norm(wte(ids)))                      # smear only in the 2026-03-14 layout
    for i, block in enumerate(transformer.h):
        x = resid_lambdas[i] * x + x0_lambdas[i] * x0   # <- lambdas of block i act on the previous hook point
        x = block(x, value_embeds[i](ids))             # blocks.{i}.hook_resid_post = this x
        x_backout = x if i == n_layer // 2              # (2026-03-14 layout)
    x = x - backout_lambda * x_backout                  # after the last hook point
    logits = softcap(lm_head(norm(x)))

So the residual stream after block i is recorded before block i+1 rescales it by `resid_lambdas[i+1]`
and adds `x0_lambdas[i+1] * x0`; a vector added there (steering) is rescaled the same way, and at layer
`n_layer // 2` it is also part of what backout subtracts before the final norm. The last hook point is
before backout and the final norm.

`generate` is deliberately absent: `helpers.chat` and `collect.sample_completions` run their own KV-cached
loops, which this class supports.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

MODEL_TYPE = "nanochat_gpt"


class NanoChatGPTConfig(PretrainedConfig):
    """nanochat `GPTConfig` plus the behaviours that left no key in a checkpoint (see `nanochat_layouts`).

    Shapes use transformers' names (`hidden_size` = nanochat's `n_embd`, ...), so code written for any
    causal LM reads them. Every field is written to config.json by `save_pretrained`.
    """

    model_type = MODEL_TYPE

    def __init__(
        self,
        vocab_size: int = 32768,
        padded_vocab_size: int | None = None,
        hidden_size: int = 768,
        intermediate_size: int | None = None,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 6,
        num_key_value_heads: int | None = None,
        max_position_embeddings: int = 2048,
        attention_windows: list[int] | None = None,
        window_pattern: str = "L",
        rope_theta: float = 10000.0,
        rope_tables_bf16: bool = True,
        qk_scale: float = 1.0,
        logit_softcap: float = 15.0,
        value_embed_layers: list[int] | None = None,
        ve_gate_channels: int = 0,
        ve_gate_scale: float = 2.0,
        smear_channels: int = 0,
        backout_layer: int | None = None,
        layout: str = "",
        **kwargs,
    ):
        self.vocab_size = vocab_size
        """Real vocabulary (the tokenizer's); logits are cropped to it."""
        self.padded_vocab_size = padded_vocab_size or vocab_size
        """Rows of `wte` / `lm_head` (nanochat pads to a multiple of 64 since 2025-12-09)."""
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        """nanochat's `sequence_len` (the training context)."""
        self.attention_windows = list(attention_windows or [max_position_embeddings] * num_hidden_layers)
        """Per layer, how many earlier positions a query may attend to (FlashAttention's left window: a
        query at position p sees keys at p - window ... p)."""
        self.window_pattern = window_pattern
        """The `window_pattern` the windows were computed from (for the record)."""
        self.rope_theta = float(rope_theta)
        self.rope_tables_bf16 = bool(rope_tables_bf16)
        """Round the rotary cos/sin tables to bfloat16, as upstream code before 2026-03-04 did on every
        device."""
        self.qk_scale = float(qk_scale)
        """q and k are multiplied by this after QK-norm (1.15 from 2026-03-09, 1.2 from 2026-03-14)."""
        self.logit_softcap = float(logit_softcap)
        self.value_embed_layers = list(value_embed_layers or [])
        """Layers that add a value embedding to their attention values."""
        self.ve_gate_channels = int(ve_gate_channels)
        """Input channels of the per-head value-embedding gate; 0 = no gate (a scalar `v0_lambdas[i]`)."""
        self.ve_gate_scale = float(ve_gate_scale)
        """gate = ve_gate_scale * sigmoid(ve_gate(x[..., :ve_gate_channels])): 2 until 2026-03-09, then 3."""
        self.smear_channels = int(smear_channels)
        """Input channels of the smear gate (24); 0 = no smear."""
        self.backout_layer = backout_layer
        """The block whose output is subtracted (times `backout_lambda`) before the final norm; None for
        no backout."""
        self.layout = layout
        """Which nanochat layout this is (a name from `nanochat_layouts.LAYOUTS`)."""
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        n = self.num_hidden_layers
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
                f"{self.num_key_value_heads}"
            )
        if len(self.attention_windows) != n:
            raise ValueError(f"attention_windows has {len(self.attention_windows)} entries for {n} layers")
        if not all(0 <= i < n for i in self.value_embed_layers):
            raise ValueError(f"value_embed_layers {self.value_embed_layers} are not all in 0..{n - 1}")
        if self.backout_layer is not None and not 0 <= self.backout_layer < n:
            raise ValueError(f"backout_layer {self.backout_layer} is not in 0..{n - 1}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def norm(x: torch.Tensor) -> torch.Tensor:
    """nanochat's parameter-free RMSNorm (eps=None: the input dtype's machine epsilon)."""
    return F.rms_norm(x, (x.size(-1),))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """nanochat's rotary embedding on [batch, seq, heads, head_dim]: the two halves of the last dim are
    rotated by -theta (the transpose of the textbook convention, as upstream; only relative angles matter).
    `cos`, `sin`: [batch, seq, 1, head_dim // 2]."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], dim=-1)


class NanoChatGPTAttention(nn.Module):
    def __init__(self, config: NanoChatGPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        d, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
        self.c_q = nn.Linear(d, d, bias=False)
        self.c_k = nn.Linear(d, kv, bias=False)
        self.c_v = nn.Linear(d, kv, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)
        gated = config.ve_gate_channels and layer_idx in config.value_embed_layers
        self.ve_gate = nn.Linear(config.ve_gate_channels, self.n_kv_head, bias=False) if gated else None
        self.ve_gate_scale = config.ve_gate_scale
        self.qk_scale = config.qk_scale

    def forward(
        self,
        x: torch.Tensor,
        ve: torch.Tensor | None,
        ve_lambda: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        """x: the normed residual [B, T, d_model]; ve: [B, T, kv_dim] or None; mask: [B, 1, T, T_keys] bool
        (True = attend) or None for plain causal attention."""
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # value residual (ResFormer): a per-token value embedding mixed into v
            ve = ve.view(B, T, self.n_kv_head, self.head_dim)
            if self.ve_gate is not None:  # per kv head, from the first channels of x: [B, T, n_kv_head]
                gate = self.ve_gate_scale * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate.in_features]))
                v = v + gate.unsqueeze(-1) * ve
            else:
                v = v + ve_lambda * ve
        cos, sin = rope
        q, k = norm(rotate(q, cos, sin)), norm(rotate(k, cos, sin))  # rotary, then QK-norm (upstream order)
        if self.qk_scale != 1.0:
            q, k = q * self.qk_scale, k * self.qk_scale
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, head_dim]
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # [B, n_kv_head, T_keys, head_dim]
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and T > 1,
            enable_gqa=self.n_kv_head != self.n_head,
        )
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class NanoChatGPTMLP(nn.Module):
    def __init__(self, config: NanoChatGPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.c_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())  # relu², as nanochat


class NanoChatGPTBlock(nn.Module):
    """One decoder layer; its output is `blocks.{i}.hook_resid_post` (a tensor, not a tuple)."""

    def __init__(self, config: NanoChatGPTConfig, layer_idx: int):
        super().__init__()
        self.attn = NanoChatGPTAttention(config, layer_idx)
        self.mlp = NanoChatGPTMLP(config)

    def forward(self, x, ve, ve_lambda, rope, mask, cache) -> torch.Tensor:
        x = x + self.attn(norm(x), ve, ve_lambda, rope, mask, cache)
        return x + self.mlp(norm(x))


class NanoChatGPTForCausalLM(PreTrainedModel):
    """nanochat's 2026 `GPT` as a transformers-style causal LM. Parameter names are upstream's, so a native
    state dict (without torch.compile's `_orig_mod.` prefix) loads as is."""

    config_class = NanoChatGPTConfig
    config: NanoChatGPTConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    _no_split_modules = ["NanoChatGPTBlock"]
    _supports_sdpa = True

    def __init__(self, config: NanoChatGPTConfig):
        super().__init__(config)
        n, d, v = config.num_hidden_layers, config.hidden_size, config.padded_vocab_size
        self.transformer = nn.ModuleDict(
            {"wte": nn.Embedding(v, d), "h": nn.ModuleList(NanoChatGPTBlock(config, i) for i in range(n))}
        )
        self.lm_head = nn.Linear(d, v, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(n))
        self.x0_lambdas = nn.Parameter(torch.zeros(n))
        kv_dim = config.num_key_value_heads * config.head_dim
        self.value_embeds = nn.ModuleDict(
            {str(i): nn.Embedding(v, kv_dim) for i in config.value_embed_layers}
        )
        if config.value_embed_layers and not config.ve_gate_channels:  # one scalar per layer (2026-01-16)
            self.v0_lambdas = nn.Parameter(torch.zeros(n))
        if config.smear_channels:
            self.smear_gate = nn.Linear(config.smear_channels, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout_layer is not None:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        # Read by the sampler and chat for stop tokens (they prefer the tokenizer's nanochat specials).
        ids = {k: getattr(config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        self.generation_config = GenerationConfig(**ids)
        self.post_init()

    # --- transformers plumbing --------------------------------------------------------------------
    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Only for a model built from a config (tests, random init); loaded checkpoints overwrite it."""
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=module.weight.shape[-1] ** -0.5)
        elif isinstance(module, NanoChatGPTForCausalLM):
            module.resid_lambdas.fill_(1.0)
            module.x0_lambdas.fill_(0.1)
            for name in ("v0_lambdas", "smear_lambda", "backout_lambda"):
                if hasattr(module, name):
                    getattr(module, name).fill_(0.2)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def generate(self, *args, **kwargs):
        raise NotImplementedError(
            "NanoChatGPTForCausalLM has no generate(): use helpers.chat(lm, ...) for one reply or "
            "helpers.collect.sample_completions for batched sampling (both KV-cached)."
        )

    # --- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
    ) -> CausalLMOutputWithPast:
        """`input_ids` [B, T]; `attention_mask` [B, past + T] (1 = real token); `position_ids` [B, T]
        (default: real tokens counted from the mask, or past + arange(T)); `past_key_values` (or `cache`)
        a transformers `DynamicCache`, updated in place; `logits_to_keep` > 0 computes logits for the last
        positions only. Returns `.logits` [B, T or logits_to_keep, vocab_size] in float32."""
        cfg = self.config
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:
            cache = DynamicCache(config=cfg)
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        key_pos, query_pos, padded = self._positions(attention_mask, past, B, T, input_ids.device)
        rope_pos = position_ids if position_ids is not None else query_pos
        rope = self._rope(rope_pos)
        masks = {
            w: self._mask(w, key_pos, query_pos, attention_mask, padded, past)
            for w in set(cfg.attention_windows)
        }

        # Embeddings may be stored in bf16 (as nanochat stores them): compute in the matrices' dtype.
        x = norm(self.transformer.wte(input_ids).to(self.lm_head.weight.dtype))
        if cfg.smear_channels:
            x = self._smear(x, rope_pos, cache)
        x0 = x
        hidden = [x] if output_hidden_states else None
        x_backout = None
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](input_ids).to(x.dtype) if str(i) in self.value_embeds else None
            ve_lambda = self.v0_lambdas[i] if ve is not None and hasattr(self, "v0_lambdas") else None
            x = block(x, ve, ve_lambda, rope, masks[cfg.attention_windows[i]], cache)
            if hidden is not None:
                hidden.append(x)
            if i == cfg.backout_layer:
                x_backout = x
        if x_backout is not None:
            x = x - self.backout_lambda.to(x.dtype) * x_backout
        x = norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)[..., : cfg.vocab_size].float()  # crop the padded vocabulary
        logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
        out = CausalLMOutputWithPast(logits=logits, hidden_states=tuple(hidden) if hidden else None)
        if use_cache or past_key_values is not None:
            out[_CACHE_FIELD] = cache
        return out if return_dict is not False else out.to_tuple()

    def _positions(self, attention_mask, past: int, B: int, T: int, device):
        """(key positions [B or 1, past + T], query positions [B or 1, T], padded?): positions count real
        tokens only, so a padded row sees the positions of its unpadded sequence."""
        if attention_mask is None:
            key_pos = torch.arange(past + T, device=device)[None]
            return key_pos, key_pos[:, past:], False
        if attention_mask.shape != (B, past + T):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but the cache holds {past} "
                f"positions and input_ids has {T}: pass a mask of shape ({B}, {past + T}) covering cached "
                "and new tokens"
            )
        real = attention_mask.bool()
        padded = not bool(real.all())
        if not padded:
            key_pos = torch.arange(past + T, device=device)[None]
            return key_pos, key_pos[:, past:], False
        key_pos = (real.cumsum(-1) - 1).clamp(min=0)
        return key_pos, key_pos[:, past:], True

    def _rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, T, 1, head_dim // 2] as upstream computes its tables (float32 angles, then the
        tables rounded to bfloat16 where the checkpoint's code did so, else kept in the model dtype)."""
        hd = self.config.head_dim
        channels = torch.arange(0, hd, 2, dtype=torch.float32, device=pos.device)
        inv_freq = 1.0 / (self.config.rope_theta ** (channels / hd))
        freqs = pos.to(torch.float32)[..., None] * inv_freq  # [B, T, head_dim // 2]
        cos, sin = freqs.cos(), freqs.sin()
        if self.config.rope_tables_bf16:
            cos, sin = cos.bfloat16(), sin.bfloat16()
        dtype = self.lm_head.weight.dtype  # the compute dtype
        return cos.to(dtype)[:, :, None, :], sin.to(dtype)[:, :, None, :]

    @staticmethod
    def _mask(window: int, key_pos, query_pos, attention_mask, padded: bool, past: int):
        """[B, 1, T, past + T] bool (True = attend): causal by position, within `window` earlier positions,
        padded keys excluded; None when plain causal attention computes the same."""
        T, n_keys = query_pos.shape[1], key_pos.shape[1]
        if not padded and window >= n_keys - 1 and T in (1, n_keys):
            return None  # causal SDPA (or one query seeing every key): the window never bites
        diff = query_pos[:, :, None] - key_pos[:, None, :]  # [B, T, n_keys]
        allowed = (diff >= 0) & (diff <= window)
        if padded:
            allowed &= attention_mask.bool()[:, None, :]
            # A padded query would see no key at all (SDPA then returns NaN): let it see itself.
            allowed[:, torch.arange(T), past + torch.arange(T)] = True
        return allowed[:, None]

    def _smear(self, x: torch.Tensor, pos: torch.Tensor, cache: Cache | None) -> torch.Tensor:
        """Mix the previous token's normed embedding into each position (2026-03-14 layout):
        x_t += smear_lambda * sigmoid(smear_gate(x_t[:smear_channels])) * x_{t-1}, except at position 0.
        With a cache, the previous embeddings are kept in an extra cache layer after the attention layers
        (so the sampler's `batch_select_indices` keeps them aligned with the rows)."""
        prev = torch.cat([x.new_zeros(x[:, :1].shape), x[:, :-1]], dim=1)  # [B, T, d]
        if cache is not None:
            slot = self.config.num_hidden_layers
            while len(cache.layers) <= slot:
                cache.layers.append(DynamicLayer())
            if cache.layers[slot].get_seq_length():
                prev[:, 0] = cache.layers[slot].keys[:, 0, -1]
            cache.update(x[:, None], x[:, None, :, :0], slot)  # keys [B, 1, T, d]; no values
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(
            self.smear_gate(x[..., : self.config.smear_channels])
        )
        gate = gate * (pos > 0)[..., None].to(x.dtype)  # nothing before the first real token
        return x + gate * prev


_CACHE_FIELD = (
    "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"
)
"""transformers renamed CausalLMOutputWithPast.past_key_values to .cache (5.2x); Colab's 5.15 has the old
name."""

AutoConfig.register(MODEL_TYPE, NanoChatGPTConfig, exist_ok=True)
AutoModelForCausalLM.register(NanoChatGPTConfig, NanoChatGPTForCausalLM, exist_ok=True)


def count_parameters(config: NanoChatGPTConfig) -> int:
    """Parameters of a model of this config, counted on the meta device (no memory used)."""
    with torch.device("meta"):
        return sum(p.numel() for p in NanoChatGPTForCausalLM(config).parameters())
