"""Reading and writing model configs: the released ``config.json`` exactly as shipped, and YAML presets.

``from_release_config`` parses the release layout (a ``kimi_k25`` config nesting a DeepSeek-V3 ``text_config``
and a MoonViT ``vision_config`` with raw ``vt_*`` names, or a plain DeepSeek-V3 / Kimi-K2 text config) into the
frozen dataclasses of :mod:`k25jax.config`; ``to_release_config`` is its inverse. Every required field missing,
every unsupported value and every inconsistency raises :class:`~k25jax.config.ConfigError` naming the field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from k25jax.config import ConfigError, K25Config, QuantConfig, TextConfig, VisionConfig, YarnRope

_MISSING = object()


def _get(d: Mapping, key: str, prefix: str, default: Any = _MISSING, types: type | tuple = (int,)) -> Any:
    if key not in d or d[key] is None and default is not _MISSING and default is not None:
        if default is _MISSING:
            raise ConfigError(f"{prefix}.{key} is required but missing")
        return default
    value = d[key]
    if value is None and default is None:
        return None
    if types is float:
        types = (int, float)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise ConfigError(f"{prefix}.{key} must be {_type_names(types)}, got {value!r}")
    return value


def _as_tuple(types: type | tuple) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def _type_names(types: type | tuple) -> str:
    return " or ".join(t.__name__ for t in _as_tuple(types))


def _parse_rope(tc: Mapping, prefix: str) -> tuple[float, YarnRope | None]:
    """Read ``rope_theta`` and YaRN scaling from ``rope_scaling`` (``type``; theta beside it) or
    ``rope_parameters`` (``rope_type``, theta inside: what transformers >= 5 writes). A config holding both
    spellings must say the same in each."""
    params = tc.get("rope_parameters")
    scaling = tc.get("rope_scaling")
    if params is not None and scaling is not None:
        from_params = _parse_rope_spelling(tc, params, "rope_parameters", prefix)
        from_scaling = _parse_rope_spelling(tc, scaling, "rope_scaling", prefix)
        if from_params != from_scaling:
            raise ConfigError(
                f"{prefix}: rope_scaling and rope_parameters disagree (theta, yarn): {from_scaling} vs {from_params}"
            )
        return from_params
    if params is not None:
        return _parse_rope_spelling(tc, params, "rope_parameters", prefix)
    return _parse_rope_spelling(tc, scaling, "rope_scaling", prefix)


def _parse_rope_spelling(tc: Mapping, rope: Any, source_key: str, prefix: str) -> tuple[float, YarnRope | None]:
    theta = tc.get("rope_theta")
    if rope is not None and not isinstance(rope, Mapping):
        raise ConfigError(f"{prefix}.{source_key} must be an object, got {rope!r}")
    if rope is not None and "rope_theta" in rope:
        theta = rope["rope_theta"]
    if theta is None:
        theta = 10000.0
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise ConfigError(f"{prefix}.rope_theta must be a positive number, got {theta!r}")
    if rope is None:
        return float(theta), None
    kind = rope.get("rope_type", rope.get("type"))
    if kind in (None, "default"):
        return float(theta), None
    if kind != "yarn":
        raise ConfigError(f"{prefix}.{source_key}.rope_type: only 'yarn' (or default) is supported, got {kind!r}")
    p = f"{prefix}.{source_key}"
    yarn = YarnRope(
        factor=float(_get(rope, "factor", p, types=float)),
        original_max_position_embeddings=int(_get(rope, "original_max_position_embeddings", p)),
        beta_fast=float(_get(rope, "beta_fast", p, 32.0, float)),
        beta_slow=float(_get(rope, "beta_slow", p, 1.0, float)),
        mscale=float(_get(rope, "mscale", p, 1.0, float)),
        mscale_all_dim=float(_get(rope, "mscale_all_dim", p, 0.0, float)),
    )
    if yarn.factor < 1.0:
        raise ConfigError(f"{p}.factor must be >= 1, got {yarn.factor}")
    return float(theta), yarn


def _parse_quant(q: Mapping | None, prefix: str) -> QuantConfig | None:
    if q is None:
        return None
    if not isinstance(q, Mapping):
        raise ConfigError(f"{prefix} must be an object, got {q!r}")
    method = q.get("quant_method", "compressed-tensors")
    if method != "compressed-tensors":
        raise ConfigError(f"{prefix}.quant_method: only 'compressed-tensors' is supported, got {method!r}")
    fmt = q.get("format", "pack-quantized")
    groups = q.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        raise ConfigError(f"{prefix}.config_groups is required but missing")
    if len(groups) != 1:
        raise ConfigError(f"{prefix}.config_groups: exactly one group is supported, got {sorted(groups)}")
    gname, group = next(iter(groups.items()))
    gp = f"{prefix}.config_groups.{gname}"
    if group.get("input_activations") is not None:
        raise ConfigError(f"{gp}.input_activations: activation quantization is not supported")
    w = group.get("weights")
    if not isinstance(w, Mapping):
        raise ConfigError(f"{gp}.weights is required but missing")
    wp = f"{gp}.weights"
    if w.get("type", "int") != "int":
        raise ConfigError(f"{wp}.type: only 'int' is supported, got {w.get('type')!r}")
    if w.get("strategy", "group") != "group":
        raise ConfigError(f"{wp}.strategy: only 'group' is supported, got {w.get('strategy')!r}")
    if w.get("actorder") not in (None, False, "static"):
        raise ConfigError(f"{wp}.actorder: activation ordering is not supported, got {w.get('actorder')!r}")
    if q.get("kv_cache_scheme") is not None:
        raise ConfigError(f"{prefix}.kv_cache_scheme: KV cache quantization is not supported (K2.5 has none)")
    ignore = q.get("ignore") or []
    return QuantConfig(
        num_bits=int(_get(w, "num_bits", wp)),
        group_size=int(_get(w, "group_size", wp)),
        symmetric=bool(_get(w, "symmetric", wp, True, bool)),
        format=str(fmt),
        ignore=tuple(ignore),
    )


def parse_text_config(tc: Mapping, prefix: str = "text_config") -> TextConfig:
    """Parse a DeepSeek-V3 / Kimi-K2 text config dict (release names)."""
    model_type = tc.get("model_type", "deepseek_v3")
    if model_type not in ("deepseek_v3", "kimi_k2", "kimi_k25_text"):
        raise ConfigError(f"{prefix}.model_type: expected deepseek_v3 or kimi_k2, got {model_type!r}")
    scoring = tc.get("scoring_func", "sigmoid")
    if scoring != "sigmoid":
        raise ConfigError(f"{prefix}.scoring_func: only 'sigmoid' is supported, got {scoring!r}")
    topk_method = tc.get("topk_method", "noaux_tc")
    if topk_method != "noaux_tc":
        raise ConfigError(f"{prefix}.topk_method: only 'noaux_tc' is supported, got {topk_method!r}")
    if tc.get("moe_layer_freq", 1) != 1:
        raise ConfigError(f"{prefix}.moe_layer_freq: only 1 is supported, got {tc.get('moe_layer_freq')!r}")
    if tc.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{prefix}.hidden_act: only 'silu' is supported, got {tc.get('hidden_act')!r}")
    if tc.get("attention_bias", False):
        raise ConfigError(f"{prefix}.attention_bias: attention biases are not supported")
    if tc.get("tie_word_embeddings", False):
        raise ConfigError(f"{prefix}.tie_word_embeddings: tied embeddings are not supported (K2.5 unties them)")
    if tc.get("rope_interleave", True) is not True:
        raise ConfigError(f"{prefix}.rope_interleave: only interleaved rope is supported")
    heads = _get(tc, "num_attention_heads", prefix)
    kv_heads = tc.get("num_key_value_heads", heads)
    if kv_heads not in (None, heads):
        raise ConfigError(f"{prefix}.num_key_value_heads ({kv_heads}) must equal num_attention_heads ({heads}) for MLA")
    theta, yarn = _parse_rope(tc, prefix)
    n_group = tc.get("n_group")
    topk_group = tc.get("topk_group")
    rms_eps = float(_get(tc, "rms_norm_eps", prefix, 1e-6, float))
    cfg = TextConfig(
        vocab_size=_get(tc, "vocab_size", prefix),
        hidden_size=_get(tc, "hidden_size", prefix),
        intermediate_size=_get(tc, "intermediate_size", prefix),
        moe_intermediate_size=_get(tc, "moe_intermediate_size", prefix),
        num_hidden_layers=_get(tc, "num_hidden_layers", prefix),
        num_attention_heads=heads,
        q_lora_rank=_get(tc, "q_lora_rank", prefix, None),
        kv_lora_rank=_get(tc, "kv_lora_rank", prefix),
        qk_nope_head_dim=_get(tc, "qk_nope_head_dim", prefix),
        qk_rope_head_dim=_get(tc, "qk_rope_head_dim", prefix),
        v_head_dim=_get(tc, "v_head_dim", prefix),
        n_routed_experts=_get(tc, "n_routed_experts", prefix),
        num_experts_per_tok=_get(tc, "num_experts_per_tok", prefix),
        n_shared_experts=_get(tc, "n_shared_experts", prefix, 1),
        first_k_dense_replace=_get(tc, "first_k_dense_replace", prefix, 0),
        n_group=1 if n_group is None else _get(tc, "n_group", prefix),
        topk_group=1 if topk_group is None else _get(tc, "topk_group", prefix),
        norm_topk_prob=bool(_get(tc, "norm_topk_prob", prefix, True, bool)),
        routed_scaling_factor=float(_get(tc, "routed_scaling_factor", prefix, 1.0, float)),
        rms_norm_eps=rms_eps,
        latent_norm_eps=float(_get(tc, "latent_norm_eps", prefix, 1e-6, float)),
        rope_theta=theta,
        rope_scaling=yarn,
        max_position_embeddings=_get(tc, "max_position_embeddings", prefix, 4096),
    )
    if not cfg.norm_topk_prob:
        raise ConfigError(f"{prefix}.norm_topk_prob: only true is supported (K2.5 normalises top-k weights)")
    cfg.validate()
    return cfg


_VISION_KEYS = {
    # field: (release name, transformers name)
    "hidden_size": ("vt_hidden_size", "hidden_size"),
    "num_hidden_layers": ("vt_num_hidden_layers", "num_hidden_layers"),
    "num_attention_heads": ("vt_num_attention_heads", "num_attention_heads"),
    "intermediate_size": ("vt_intermediate_size", "intermediate_size"),
    "patch_size": ("patch_size", "patch_size"),
    "pos_emb_height": ("init_pos_emb_height", "pos_emb_height"),
    "pos_emb_width": ("init_pos_emb_width", "pos_emb_width"),
    "pos_emb_time": ("init_pos_emb_time", "pos_emb_time"),
}


def parse_vision_config(vc: Mapping, text_hidden_size: int, prefix: str = "vision_config") -> VisionConfig:
    """Parse ``vision_config`` with the raw release names (``vt_*``); transformers' names are accepted too."""
    values: dict[str, Any] = {}
    for field_name, (release, hf) in _VISION_KEYS.items():
        if release in vc:
            values[field_name] = _get(vc, release, prefix)
        elif hf in vc:
            values[field_name] = _get(vc, hf, prefix)
        else:
            raise ConfigError(f"{prefix}.{release} is required but missing")
    checks = {
        "merge_type": "sd2_tpool",
        "pos_emb_type": "divided_fixed",
        "video_attn_type": "spatial_temporal",
        "mm_projector_type": "patchmerger",
    }
    for key, expected in checks.items():
        if key in vc and vc[key] != expected:
            raise ConfigError(f"{prefix}.{key}: only {expected!r} is supported, got {vc[key]!r}")
    act = vc.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise ConfigError(f"{prefix}.projector_hidden_act: only 'gelu' is supported, got {act!r}")
    merge = vc.get("merge_kernel_size", [2, 2])
    if not (isinstance(merge, (list, tuple)) and len(merge) == 2 and all(isinstance(m, int) for m in merge)):
        raise ConfigError(f"{prefix}.merge_kernel_size must be two integers, got {merge!r}")
    values["merge_kernel_size"] = (int(merge[0]), int(merge[1]))
    values["mm_hidden_size"] = _get(vc, "mm_hidden_size", prefix, values["hidden_size"])
    values["text_hidden_size"] = _get(vc, "text_hidden_size", prefix, text_hidden_size)
    values["projector_ln_eps"] = float(_get(vc, "projector_ln_eps", prefix, 1e-5, float))
    cfg = VisionConfig(**values)
    cfg.validate()
    return cfg


def from_release_config(source: Mapping | str | os.PathLike) -> K25Config:
    """Build a :class:`K25Config` from a release ``config.json`` (dict, file path or directory).

    Accepts the top-level ``kimi_k25`` layout (``text_config`` + ``vision_config``) and a plain text-only
    DeepSeek-V3 / Kimi-K2 config. Raises :class:`ConfigError` naming the offending field.
    """
    path = None
    if not isinstance(source, Mapping):
        path = os.fspath(source)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                source = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: config.json not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(source, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a JSON object at the top level")
    try:
        return _from_dict(source)
    except ConfigError as e:
        if path:
            raise ConfigError(f"{path}: {e}") from None
        raise


def _from_dict(d: Mapping) -> K25Config:
    if "text_config" in d:
        tc = d["text_config"]
        if not isinstance(tc, Mapping):
            raise ConfigError("text_config must be an object")
        text = parse_text_config(tc)
        vc = d.get("vision_config")
        vision = parse_vision_config(vc, text.hidden_size) if vc is not None else None
        quant_src, qprefix = d.get("quantization_config"), "quantization_config"
        if quant_src is None and tc.get("quantization_config") is not None:
            quant_src, qprefix = tc["quantization_config"], "text_config.quantization_config"
        if d.get("tie_word_embeddings", False):
            raise ConfigError("tie_word_embeddings: tied embeddings are not supported (K2.5 unties them)")
        top = d
    else:
        text = parse_text_config(d, prefix="config")
        vision = None
        quant_src, qprefix = d.get("quantization_config"), "quantization_config"
        top = d
    quant = _parse_quant(quant_src, qprefix)

    def tok(name: str, default: int) -> int:
        value = top.get(name, default)
        if isinstance(value, list):  # eos may be a list in some copies; the first is the turn end
            value = value[0]
        if value is None:
            return default
        if not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value

    cfg = K25Config(
        text=text,
        vision=vision,
        quantization=quant,
        media_placeholder_token_id=tok("media_placeholder_token_id", 163605),
        bos_token_id=tok("bos_token_id", 163584),
        eos_token_id=tok("eos_token_id", 163585),
        pad_token_id=tok("pad_token_id", 163839),
        name=str(d.get("_name_or_path", "custom")) or "custom",
        layout="kimi_k25" if "text_config" in d else "deepseek_v3",
    )
    return cfg.validate()


def to_release_config(cfg: K25Config) -> dict:
    """Serialise to the release ``config.json`` layout (raw ``vt_*`` vision names, ``rope_scaling``)."""
    t = cfg.text
    text = {
        "model_type": "deepseek_v3",
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "moe_intermediate_size": t.moe_intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_attention_heads,
        "q_lora_rank": t.q_lora_rank,
        "kv_lora_rank": t.kv_lora_rank,
        "qk_nope_head_dim": t.qk_nope_head_dim,
        "qk_rope_head_dim": t.qk_rope_head_dim,
        "v_head_dim": t.v_head_dim,
        "n_routed_experts": t.n_routed_experts,
        "num_experts_per_tok": t.num_experts_per_tok,
        "n_shared_experts": t.n_shared_experts,
        "first_k_dense_replace": t.first_k_dense_replace,
        "moe_layer_freq": 1,
        "n_group": t.n_group,
        "topk_group": t.topk_group,
        "norm_topk_prob": t.norm_topk_prob,
        "routed_scaling_factor": t.routed_scaling_factor,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta,
        "max_position_embeddings": t.max_position_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": False,
        "num_nextn_predict_layers": 0,
    }
    if t.latent_norm_eps != 1e-6:
        text["latent_norm_eps"] = t.latent_norm_eps
    if t.rope_scaling is not None:
        y = t.rope_scaling
        text["rope_scaling"] = {
            "type": "yarn",
            "factor": y.factor,
            "original_max_position_embeddings": y.original_max_position_embeddings,
            "beta_fast": y.beta_fast,
            "beta_slow": y.beta_slow,
            "mscale": y.mscale,
            "mscale_all_dim": y.mscale_all_dim,
        }
    out: dict[str, Any] = {
        "model_type": "kimi_k25",
        "architectures": ["KimiK25ForConditionalGeneration"],
        "text_config": text,
        "media_placeholder_token_id": cfg.media_placeholder_token_id,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "tie_word_embeddings": False,
        "use_unified_vision_chunk": True,
    }
    if cfg.vision is not None:
        v = cfg.vision
        out["vision_config"] = {
            "vt_hidden_size": v.hidden_size,
            "vt_num_hidden_layers": v.num_hidden_layers,
            "vt_num_attention_heads": v.num_attention_heads,
            "vt_intermediate_size": v.intermediate_size,
            "patch_size": v.patch_size,
            "init_pos_emb_height": v.pos_emb_height,
            "init_pos_emb_width": v.pos_emb_width,
            "init_pos_emb_time": v.pos_emb_time,
            "merge_kernel_size": list(v.merge_kernel_size),
            "merge_type": "sd2_tpool",
            "pos_emb_type": "divided_fixed",
            "video_attn_type": "spatial_temporal",
            "mm_projector_type": "patchmerger",
            "mm_hidden_size": v.mm_hidden_size,
            "text_hidden_size": v.text_hidden_size,
            "projector_ln_eps": v.projector_ln_eps,
            "projector_hidden_act": "gelu",
        }
    if cfg.quantization is not None:
        q = cfg.quantization
        quant = {
            "quant_method": "compressed-tensors",
            "format": q.format,
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "input_activations": None,
                    "output_activations": None,
                    "weights": {
                        "num_bits": q.num_bits,
                        "type": "int",
                        "symmetric": q.symmetric,
                        "strategy": "group",
                        "group_size": q.group_size,
                        "dynamic": False,
                        "actorder": None,
                        "observer": "minmax",
                    },
                }
            },
            "ignore": list(q.ignore),
        }
        out["quantization_config"] = quant
        text["quantization_config"] = json.loads(json.dumps(quant))  # a copy, not a shared object
    if cfg.layout == "deepseek_v3":
        flat = dict(text)
        flat.update({k: out[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
        flat["architectures"] = ["DeepseekV3ForCausalLM"]
        return flat
    return out


def load_yaml(path: str | os.PathLike) -> K25Config:
    """Read a YAML preset (the release ``config.json`` layout written as YAML)."""
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    try:
        return _from_dict(data).replace(name=os.path.splitext(os.path.basename(os.fspath(path)))[0])
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def dump_yaml(cfg: K25Config, path: str | os.PathLike) -> None:
    """Write ``cfg`` as a YAML preset (the release ``config.json`` layout); :func:`load_yaml` reads it back."""
    import yaml

    with open(path, "w", encoding="utf-8") as f:
        f.write(f"# {cfg.name}: model preset in the release config.json layout (k25jax.release.config.load_yaml).\n")
        yaml.safe_dump(to_release_config(cfg), f, sort_keys=False)
