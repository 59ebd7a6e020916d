"""Datasets as the paper used them: config schema (config.py), the original loaders' preprocessing
(preprocess.py), raw formats (lsun.py, faces.py, imagenet.py on sources.py, chosen by families.py),
download/extraction (download.py), the prepared random-access format (prepared.py), the prepare stage's work
(prepare.py), the latent cache (latents.py), the synthetic smoke set (builtin.py) and the reader benchmark
(bench.py)."""
