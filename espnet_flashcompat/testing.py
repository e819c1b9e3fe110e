"""Tiny, random, offline S3PRL upstreams for tests, benchmarks and the example recipe.

Real checkpoints cannot be downloaded everywhere, so this writes a randomly initialised Hugging Face
wav2vec2 or HuBERT model (``save_pretrained`` plus the ``preprocessor_config.json`` that S3PRL's
``hf_wav2vec2_custom``/``hf_hubert_custom`` upstreams require) to a directory: pass that directory as
``frontend_conf.path_or_url``. ``make_tiny_wavlm_checkpoint`` writes a random WavLM in S3PRL's own checkpoint
format, for ``upstream: wavlm_local``; ``make_tiny_hubert_checkpoint`` a random HuBERT in S3PRL's converted
format, for ``upstream: hubert_local`` (S3PRL's own HuBERT, as ``hubert_large_ll60k`` runs it).
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


def make_tiny_wavlm_checkpoint(
    path,
    num_layers: int = 2,
    dim: int = 32,
    num_heads: int = 2,
    layer_norm_first: bool = False,
    seed: int = 0,
    **cfg_overrides,
) -> Path:
    """Write a random-weight S3PRL WavLM checkpoint to the file ``path`` (reused if there); return the path.

    S3PRL's own format, ``{"cfg": WavLMConfig fields, "model": state_dict}``, as its ``wavlm_local`` upstream
    loads it: ``upstream: wavlm_local`` with ``path_or_url: <path>``. Gated relative-position bias as the released
    checkpoints (``relative_position_embedding``, ``gru_rel_pos``), with 32 buckets up to distance 64 so that short
    inputs reach the logarithmic buckets. The convolutional front end keeps the real stride (320 samples) with
    ``dim`` channels. ``layer_norm_first=True`` is wavlm_large's layout (and its layer-norm front end and
    normalized input); False is wavlm_base_plus's. ``cfg_overrides`` set any other ``WavLMConfig`` field.
    """
    out = Path(path)
    if out.is_file():
        return out
    import torch
    from s3prl.upstream.wavlm.WavLM import WavLM, WavLMConfig

    cfg = dict(
        encoder_layers=num_layers,
        encoder_embed_dim=dim,
        encoder_ffn_embed_dim=4 * dim,
        encoder_attention_heads=num_heads,
        conv_feature_layers=f"[({dim},10,5)] + [({dim},3,2)] * 4 + [({dim},2,2)] * 2",
        conv_pos=16,
        conv_pos_groups=2,
        layer_norm_first=layer_norm_first,
        extractor_mode="layer_norm" if layer_norm_first else "default",
        normalize=layer_norm_first,
        relative_position_embedding=True,
        num_buckets=32,
        max_distance=64,
        gru_rel_pos=True,
        encoder_layerdrop=0.0,
    )
    cfg.update(cfg_overrides)
    torch.manual_seed(seed)
    config = WavLMConfig(cfg)
    model = WavLM(config)
    with torch.no_grad():  # the bias table and gates as trained ones are: not at their initial values
        for module in model.modules():
            if hasattr(module, "grep_a"):
                module.grep_a.uniform_(0.5, 1.5)
                module.grep_linear.bias.normal_(0, 0.5)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"cfg": dict(vars(config)), "model": model.state_dict()}, out.with_name(out.name + ".part"))
    out.with_name(out.name + ".part").replace(out)
    return out


def make_tiny_hubert_checkpoint(path, num_layers: int = 2, dim: int = 32, num_heads: int = 2, seed: int = 0,
                                **cfg_overrides) -> Path:
    """Write a random-weight S3PRL HuBERT checkpoint to the file ``path`` (reused if there); return the path.

    S3PRL's converted format (``task_cfg``, ``model_cfg``, ``model_weight``, ``dictionaries_symbols``), as its
    ``hubert_local`` upstream loads it: ``upstream: hubert_local`` with ``path_or_url: <path>``. The layout of
    ``hubert_large_ll60k`` (pre-layer-norm, layer-norm front end, real 320-sample stride) at ``dim`` wide, with its
    dropouts (0.1, attention 0.1); ``cfg_overrides`` set any other ``HubertConfig`` field.
    """
    out = Path(path)
    if out.is_file():
        return out
    import dataclasses

    import torch
    from s3prl.upstream.hubert.hubert_model import HubertConfig, HubertModel, HubertPretrainingConfig

    cfg = dict(encoder_layers=num_layers, encoder_embed_dim=dim, encoder_ffn_embed_dim=4 * dim,
               encoder_attention_heads=num_heads, final_dim=dim, layer_norm_first=True, extractor_mode="layer_norm",
               conv_feature_layers=f"[({dim},10,5)] + [({dim},3,2)] * 4 + [({dim},2,2)] * 2", conv_pos=16,
               conv_pos_groups=2, dropout=0.1, attention_dropout=0.1, encoder_layerdrop=0.0, label_rate=50.0)
    cfg.update(cfg_overrides)
    task = {"sample_rate": 16000, "normalize": False, "label_rate": 50.0}
    torch.manual_seed(seed)
    config = HubertConfig(**{k: v for k, v in cfg.items() if k != "label_rate"}, label_rate=cfg["label_rate"])
    model = HubertModel(config, HubertPretrainingConfig(**task), [None])
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    torch.save({"task_cfg": task, "model_cfg": dataclasses.asdict(config), "model_weight": model.state_dict(),
                "dictionaries_symbols": [None]}, part)
    part.replace(out)
    return out
