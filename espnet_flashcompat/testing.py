"""Tiny, random, offline S3PRL upstreams for tests, benchmarks and the example recipe.

Real checkpoints cannot be downloaded everywhere, so this writes a randomly initialised Hugging Face
wav2vec2 or HuBERT model (``save_pretrained`` plus the ``preprocessor_config.json`` that S3PRL's
``hf_wav2vec2_custom``/``hf_hubert_custom`` upstreams require) to a directory: pass that directory as
``frontend_conf.path_or_url``.
"""

from pathlib import Path

UPSTREAM_OF = {"wav2vec2": "hf_wav2vec2_custom", "hubert": "hf_hubert_custom"}
_WRITTEN = ("config.json", "preprocessor_config.json")  # the preprocessor config is written last
_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def make_tiny_hf_upstream(
    out_dir,
    kind: str = "wav2vec2",
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    seed: int = 0,
    **config_overrides,
) -> Path:
    """Write a random HF ``kind`` model to ``out_dir`` (reused if already there); return the directory.

    The convolutional front end keeps the real stride (320 samples, 20 ms at 16 kHz) with narrow channels.
    ``layerdrop`` is 0 because S3PRL leaves the model in train mode, where layerdrop would change the
    number of hidden states from one call to the next.
    """
    out = Path(out_dir)
    if all((out / f).is_file() for f in _WRITTEN) and any((out / f).is_file() for f in _WEIGHTS):
        return out  # written before: found without importing torch and transformers (seconds)
    import torch
    from transformers import HubertConfig, HubertModel, Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    config_cls, model_cls = {
        "wav2vec2": (Wav2Vec2Config, Wav2Vec2Model),
        "hubert": (HubertConfig, HubertModel),
    }[kind]
    conv_dim = max(hidden_size, 32)
    settings = dict(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=4 * hidden_size,
        conv_dim=(conv_dim,) * 7,
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        layerdrop=0.0,
        mask_time_prob=0.0,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        feat_proj_dropout=0.0,
    )
    settings.update(config_overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**settings))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=True
    ).save_pretrained(out)
    return out
