"""Notebook 06: explore the features. Per-feature dashboards of every latent from one pass over the
activation store (`dashboards.py` on the streaming accumulators of `accumulate.py`; logit effects and
nearest decoder rows in `decoder.py`), the static HTML explorer (`site.py`), the Neuronpedia export
(`neuronpedia.py`), the deception meter (`meter.py`), live tracking of features during generation
(`live.py`), the notebook's widgets (`panel.py`, HTML in `views.py`); `pipeline.py` holds the steps.
"""
