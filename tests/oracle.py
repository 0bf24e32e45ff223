"""The numerical oracle: tiny random transformers models and release-format directories written from them.

transformers' ``DeepseekV3ForCausalLM`` and ``Kimi_K25ForConditionalGeneration`` are used through their public
classes only. A release directory is written the way Moonshot ships it: ``language_model.*`` names, routed
experts packed with compressed-tensors' own quantize and ``pack_to_int32``, bf16 elsewhere, the correction
bias float32, several shards plus an index. The torch model's weights are replaced by exactly what the
release holds (bf16-rounded, experts quantize-dequantized) so that both sides compute the same function.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import numpy as np
import torch

from k25jax.config import K25Config
from k25jax.release.config import to_release_config

torch.set_grad_enabled(False)


def hf_text_kwargs(cfg: K25Config) -> dict:
    t = cfg.text
    kw = dict(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        moe_intermediate_size=t.moe_intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_attention_heads,
        n_shared_experts=t.n_shared_experts,
        n_routed_experts=t.n_routed_experts,
        routed_scaling_factor=t.routed_scaling_factor,
        kv_lora_rank=t.kv_lora_rank,
        q_lora_rank=t.q_lora_rank,
        qk_rope_head_dim=t.qk_rope_head_dim,
        v_head_dim=t.v_head_dim,
        qk_nope_head_dim=t.qk_nope_head_dim,
        n_group=t.n_group,
        topk_group=t.topk_group,
        num_experts_per_tok=t.num_experts_per_tok,
        first_k_dense_replace=t.first_k_dense_replace,
        norm_topk_prob=t.norm_topk_prob,
        rms_norm_eps=t.rms_norm_eps,
        max_position_embeddings=t.max_position_embeddings,
        tie_word_embeddings=False,
        num_mtp_layers=0,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
    )
    rope = {"rope_type": "default", "rope_theta": t.rope_theta}
    if t.rope_scaling is not None:
        y = t.rope_scaling
        rope = {
            "rope_type": "yarn",
            "rope_theta": t.rope_theta,
            "factor": y.factor,
            "original_max_position_embeddings": y.original_max_position_embeddings,
            "beta_fast": y.beta_fast,
            "beta_slow": y.beta_slow,
            "mscale": y.mscale,
            "mscale_all_dim": y.mscale_all_dim,
        }
    kw["rope_parameters"] = rope
    return kw


def make_hf_text_model(cfg: K25Config, seed: int = 0, bias_scale: float = 0.05, std: float = 0.05):
    """A random float32 ``DeepseekV3ForCausalLM`` whose weights equal what a release of it would hold."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    hf_cfg = DeepseekV3Config(**hf_text_kwargs(cfg))
    hf_cfg._attn_implementation = "eager"
    model = DeepseekV3ForCausalLM(hf_cfg).float().eval()
    randomize_(model, cfg, seed, bias_scale, std)
    return model


def make_hf_kimi_model(cfg: K25Config, seed: int = 0, bias_scale: float = 0.05, std: float = 0.05):
    """A random float32 ``Kimi_K25ForConditionalGeneration`` (text + vision + projector)."""
    from transformers import Kimi_K25Config, Kimi_K25ForConditionalGeneration

    torch.manual_seed(seed)
    text = hf_text_kwargs(cfg)
    text["model_type"] = "deepseek_v3"
    v = cfg.vision
    vision = dict(
        patch_size=v.patch_size,
        pos_emb_height=v.pos_emb_height,
        pos_emb_width=v.pos_emb_width,
        pos_emb_time=v.pos_emb_time,
        num_attention_heads=v.num_attention_heads,
        num_hidden_layers=v.num_hidden_layers,
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        merge_kernel_size=list(v.merge_kernel_size),
        rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta},
    )
    hf_cfg = Kimi_K25Config(
        text_config=text,
        vision_config=vision,
        projection_hidden_size=v.mm_hidden_size,
        projection_layer_norm_eps=v.projector_ln_eps,
        image_token_id=cfg.media_placeholder_token_id,
        # transformers gives video its own placeholder (163840 = the vocab size in K2.5, zeroed before the
        # embedding lookup); the release text uses <|media_pad|> for video chunks too. Mirror the layout.
        video_token_id=cfg.text.vocab_size,
        tie_word_embeddings=False,
    )
    hf_cfg._attn_implementation = "eager"
    hf_cfg.text_config._attn_implementation = "eager"
    hf_cfg.vision_config._attn_implementation = "eager"
    model = Kimi_K25ForConditionalGeneration(hf_cfg).float().eval()
    randomize_(model, cfg, seed, bias_scale, std)
    return model


def randomize_(model, cfg: K25Config, seed: int, bias_scale: float, std: float) -> None:
    """Fill every parameter with random values that survive the release round trip exactly.

    Matrices get normal(0, std), norms 1 + normal(0, 0.1), the correction bias normal(0, bias_scale) (float32);
    everything else is rounded to bf16, and routed experts are quantized and dequantized (INT4, group 32).
    """
    gen = torch.Generator().manual_seed(seed + 1)
    # INT4 experts: remember (q, scale) so the release holds exactly these (re-quantizing q * scale is not
    # idempotent: the group maximum maps to -8 and would grow the scale).
    model._k25_int4 = {}
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("e_score_correction_bias"):
            p.copy_(torch.randn(p.shape, generator=gen) * bias_scale)
            continue
        if not p.is_floating_point() or "time_position_embeddings" in name or "inv_freq" in name:
            continue
        if name.endswith("weight") and p.ndim == 1 and "norm" in name:
            value = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
        elif name.endswith("bias") and p.ndim == 1:
            value = 0.02 * torch.randn(p.shape, generator=gen)
        else:
            value = std * torch.randn(p.shape, generator=gen)
        value = value.to(torch.bfloat16).float()
        if ".experts." in name and cfg.quantization is not None:
            g = cfg.quantization.group_size
            q, scale = quantize_ct(value.reshape(-1, value.shape[-1]), g)
            model._k25_int4[name] = (q.reshape(value.shape), scale.reshape(*value.shape[:-1], -1))
            value = (q.float() * scale.float().repeat_interleave(g, dim=-1)).reshape(value.shape)
        p.copy_(value)


def _qargs(group_size: int):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)


def quantize_ct(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' own symmetric group quantization of ``w [out, in]``: ``(int8 q, bf16 scale)``."""
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = _qargs(group_size)
    wb = w.to(torch.bfloat16)
    g = wb.reshape(*wb.shape[:-1], -1, group_size)
    scale, zero = calculate_qparams(g.amin(-1), g.amax(-1), args)
    q = quantize(wb, scale, zero, args, dtype=torch.int8)
    return q, scale.to(torch.bfloat16)


def _expert_tensors(prefix: str, w: torch.Tensor, cfg: K25Config, qs=None) -> dict[str, torch.Tensor]:
    """One routed-expert projection ``w [out, in]`` in release form (packed INT4, or bf16 if unquantized).

    ``qs``: the ``(q, scale)`` it was made from, when known; otherwise ``w`` is quantized here.
    """
    if cfg.quantization is None:
        return {f"{prefix}.weight": w.to(torch.bfloat16)}
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    q, scale = qs if qs is not None else quantize_ct(w, cfg.quantization.group_size)
    return {
        f"{prefix}.weight_packed": pack_to_int32(q, 4),
        f"{prefix}.weight_scale": scale,
        f"{prefix}.weight_shape": torch.tensor(list(w.shape), dtype=torch.int32),
    }


# transformers name piece -> release name piece: the inverse of the renames in transformers'
# conversion_mapping["kimi_k25"]. Checked by test_oracle_release_names_match_transformers_loader, where
# transformers' own loader reads these release tensors back into exactly the model they came from.
_VISION_RENAMES = [
    ("attn.proj.", "wo."),
    ("mlp.fc1.", "mlp.fc0_TMP."),
    ("mlp.fc2.", "mlp.fc1."),
    ("mlp.fc0_TMP.", "mlp.fc0."),
    ("norm1.", "norm0_TMP."),
    ("norm2.", "norm1."),
    ("norm0_TMP.", "norm0."),
]


def release_tensors(model, cfg: K25Config) -> dict[str, torch.Tensor]:
    """The release-named tensors of a transformers model (experts split per expert and packed)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    int4 = getattr(model, "_k25_int4", {})
    out: dict[str, torch.Tensor] = {}
    pre = "" if cfg.layout == "deepseek_v3" else "language_model."
    F = cfg.text.moe_intermediate_size
    vision_qkv: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in sd.items():
        if "rotary_emb" in name or "time_position_embeddings" in name:
            continue
        if name.startswith("model.language_model."):
            rel = pre + "model." + name[len("model.language_model.") :]
        elif name.startswith("model.") and not name.startswith(("model.vision_tower", "model.mm_projector")):
            rel = pre + name
        elif name == "lm_head.weight":
            rel = pre + "lm_head.weight"
        else:
            rel = name
        qs = int4.get(name)
        if rel.endswith("mlp.experts.gate_up_proj"):
            base = rel[: -len("gate_up_proj")]
            for e in range(value.shape[0]):
                gq = (qs[0][e, :F], qs[1][e, :F]) if qs else None
                uq = (qs[0][e, F:], qs[1][e, F:]) if qs else None
                out.update(_expert_tensors(f"{base}{e}.gate_proj", value[e, :F], cfg, gq))
                out.update(_expert_tensors(f"{base}{e}.up_proj", value[e, F:], cfg, uq))
            continue
        if rel.endswith("mlp.experts.down_proj"):
            base = rel[: -len("down_proj")]
            for e in range(value.shape[0]):
                dq = (qs[0][e], qs[1][e]) if qs else None
                out.update(_expert_tensors(f"{base}{e}.down_proj", value[e], cfg, dq))
            continue
        if rel.startswith("model.vision_tower.") or rel.startswith("model.mm_projector."):
            rel = _vision_release_name(rel, vision_qkv, value)
            if rel is None:
                continue
        dtype = torch.float32 if rel.endswith("e_score_correction_bias") else torch.bfloat16
        out[rel] = value.to(dtype)
    for prefix, parts in vision_qkv.items():
        out.update(_fuse_qkv(prefix, parts, cfg))
    return out


def _vision_release_name(name: str, qkv: dict, value: torch.Tensor) -> str | None:
    rel = name[len("model.") :]
    rel = rel.replace("mm_projector.in_proj.", "mm_projector.proj.0.").replace(
        "mm_projector.out_proj.", "mm_projector.proj.2."
    )
    rel = rel.replace("patch_embed.pos_emb.position_embeddings", "patch_embed.pos_emb.weight")
    if rel.startswith("vision_tower.layers."):
        rel = "vision_tower.encoder.blocks." + rel[len("vision_tower.layers.") :]
    if rel.startswith("vision_tower.final_layernorm."):
        rel = "vision_tower.encoder." + rel[len("vision_tower.") :]
    for a, b in _VISION_RENAMES:
        rel = rel.replace(a, b)
    for proj in ("q_proj", "k_proj", "v_proj"):
        marker = f".attn.{proj}."
        if marker in rel:
            prefix, leaf = rel.split(marker)
            qkv.setdefault(prefix, {})[f"{proj}.{leaf}"] = value
            return None
    return rel


def _fuse_qkv(prefix: str, parts: dict, cfg: K25Config) -> dict[str, torch.Tensor]:
    """Undo transformers' load-time ``PermuteForRope``: q/k rows back to the release's interleaved order."""
    heads = cfg.vision.num_attention_heads
    out = {}
    for leaf in ("weight", "bias"):
        q, k, v = (parts[f"{p}.{leaf}"] for p in ("q_proj", "k_proj", "v_proj"))
        q, k = (_to_interleaved(x, heads) for x in (q, k))
        out[f"{prefix}.wqkv.{leaf}"] = torch.cat([q, k, v], dim=0).to(torch.bfloat16)
    return out


def _to_interleaved(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows per head in split-half order ``[evens | odds]`` -> interleaved pairs ``(0, 1), (2, 3), ...``."""
    rows = x.shape[0]
    hd = rows // heads
    y = x.reshape(heads, 2, hd // 2, *x.shape[1:])
    return y.transpose(1, 2).reshape(x.shape)


def write_release(
    tensors: dict[str, torch.Tensor],
    cfg: K25Config,
    out_dir: str | os.PathLike,
    num_shards: int = 3,
    extra_config: dict | None = None,
) -> str:
    """Write ``tensors`` as a release directory: ``config.json``, shards and ``model.safetensors.index.json``."""
    from safetensors.torch import save_file

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    names = list(tensors)
    chunks = [names[i::num_shards] for i in range(num_shards)]
    weight_map = {}
    for i, chunk in enumerate(chunks):
        file = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in chunk}, os.path.join(out_dir, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in chunk})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    config = to_release_config(cfg)
    if extra_config:
        config.update(extra_config)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return out_dir


def torch_logits(model, input_ids: np.ndarray, **kwargs) -> np.ndarray:
    out = model(input_ids=torch.as_tensor(np.asarray(input_ids), dtype=torch.long), **kwargs)
    return out.logits.float().numpy()


def text_param_tree(model, cfg: K25Config) -> Iterable:
    """Release-named tensors of the text stack only (for text-only release directories)."""
    return {k: v for k, v in release_tensors(model, cfg).items() if not k.startswith(("vision_tower", "mm_projector"))}


# release name piece -> transformers name piece inside a vision block: the inverse of _VISION_RENAMES.
_VISION_BLOCK_NAMES = {
    "wo.": "attn.proj.",
    "mlp.fc0.": "mlp.fc1.",
    "mlp.fc1.": "mlp.fc2.",
    "norm0.": "norm1.",
    "norm1.": "norm2.",
}
_EXPERT_LEAVES = ("weight_packed", "weight_scale", "weight_shape", "weight")


def read_release_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` file in a release directory, by release name."""
    from safetensors.torch import load_file

    path = os.fspath(path)
    out: dict[str, torch.Tensor] = {}
    for file in sorted(f for f in os.listdir(path) if f.endswith(".safetensors")):
        for name, value in load_file(os.path.join(path, file)).items():
            if name in out:
                raise ValueError(f"{path}/{file}: tensor {name} is also in another shard")
            out[name] = value
    return out


def _release_qargs(path: str) -> dict | None:
    """The compressed-tensors weight args of a release's ``config.json`` (None when unquantized)."""
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    q = config.get("quantization_config") or config.get("text_config", {}).get("quantization_config")
    if q is None:
        return None
    if q.get("quant_method") != "compressed-tensors" or q.get("format") != "pack-quantized":
        raise ValueError(f"{path}/config.json: quantization_config is not compressed-tensors pack-quantized: {q}")
    (group,) = q["config_groups"].values()
    return group["weights"]


def decode_expert_ct(tensors: dict[str, torch.Tensor], prefix: str, weight_args: dict | None):
    """One routed-expert projection of a release, decoded by compressed-tensors' own functions:
    ``unpack_from_int32`` of ``{prefix}.weight_packed`` to ``weight_shape`` and ``dequantize`` with the float32
    ``weight_scale`` (``q * s`` exact in float32). Returns ``(float32 w [out, in], (int8 q, bf16 scale) or None)``;
    a bf16 ``{prefix}.weight`` (unquantized experts) comes back as float32."""
    if f"{prefix}.weight" in tensors:
        return tensors[f"{prefix}.weight"].float(), None
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    if weight_args is None:
        raise ValueError(f"{prefix}.weight_packed: the release's config.json has no quantization_config")
    args = QuantizationArgs(**weight_args)
    packed, scale = tensors[f"{prefix}.weight_packed"], tensors[f"{prefix}.weight_scale"]
    shape = torch.Size(tensors[f"{prefix}.weight_shape"].tolist())
    q = unpack_from_int32(packed, args.num_bits, shape)
    w = dequantize(q, scale.float(), None, args, dtype=torch.float32)
    return w, (q, scale)


def _hf_vision_name(rel: str) -> str:
    """A release vision / projector tensor name -> transformers' (the fused ``wqkv`` is split by the caller)."""
    rel = rel.replace("mm_projector.proj.0.", "mm_projector.in_proj.").replace(
        "mm_projector.proj.2.", "mm_projector.out_proj."
    )
    rel = rel.replace("patch_embed.pos_emb.weight", "patch_embed.pos_emb.position_embeddings")
    if rel.startswith("vision_tower.encoder.final_layernorm."):
        rel = "vision_tower." + rel[len("vision_tower.encoder.") :]
    if rel.startswith("vision_tower.encoder.blocks."):
        index, leaf = rel[len("vision_tower.encoder.blocks.") :].split(".", 1)
        for theirs, ours in _VISION_BLOCK_NAMES.items():
            if leaf.startswith(theirs):
                leaf = ours + leaf[len(theirs) :]
                break
        rel = f"vision_tower.layers.{index}.{leaf}"
    return "model." + rel


def _from_interleaved(x: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of :func:`_to_interleaved`: rows per head in pairs ``(0, 1), (2, 3), ...`` -> ``[evens | odds]``."""
    hd = x.shape[0] // heads
    return x.reshape(heads, hd // 2, 2, *x.shape[1:]).transpose(1, 2).reshape(x.shape)


def hf_state_from_release(tensors: dict[str, torch.Tensor], cfg: K25Config, weight_args: dict | None, *, kimi: bool):
    """Release-named tensors -> ``(transformers state dict in float32, {stacked expert name: (q, scale)})``: the
    inverse of :func:`release_tensors` (the ``language_model.`` prefix dropped, per-expert projections decoded by
    compressed-tensors and stacked into ``gate_up_proj [E, 2F, D]`` / ``down_proj [E, D, F]``, the vision ``wqkv``
    split into q/k/v with q/k rows back in transformers' split-half order, the vision renames undone).
    ``kimi``: names for ``Kimi_K25ForConditionalGeneration`` (else ``DeepseekV3ForCausalLM``)."""
    import re

    text_prefix = "model.language_model." if kimi else "model."
    expert = re.compile(
        r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(" + "|".join(_EXPERT_LEAVES) + ")$"
    )
    state: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[tuple[int, str], tuple]] = {}
    for rel, value in tensors.items():
        name = rel[len("language_model.") :] if rel.startswith("language_model.") else rel
        m = expert.match(name)
        if m:
            base, e, proj, leaf = m.groups()
            if leaf in ("weight_packed", "weight"):
                experts.setdefault(base, {})[(int(e), proj)] = decode_expert_ct(
                    tensors, rel.rsplit(".", 1)[0], weight_args
                )
            continue
        if name.startswith(("vision_tower.", "mm_projector.")):
            if not kimi:
                raise ValueError(f"release tensor {rel}: a vision tensor, but the config has no vision tower")
            if ".wqkv." in name:
                prefix, leaf = _hf_vision_name(name).split(".wqkv.")
                heads = cfg.vision.num_attention_heads
                q, k, v = value.float().chunk(3, dim=0)
                for proj, part in (("q_proj", _from_interleaved(q, heads)), ("k_proj", _from_interleaved(k, heads))):
                    state[f"{prefix}.attn.{proj}.{leaf}"] = part
                state[f"{prefix}.attn.v_proj.{leaf}"] = v
                continue
            state[_hf_vision_name(name)] = value.float()
            continue
        if name == "lm_head.weight":
            state[name] = value.float()
        elif name.startswith("model."):
            state[text_prefix + name[len("model.") :]] = value.float()
        else:
            raise ValueError(f"release tensor {rel}: not a name this oracle knows")
    int4: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for base, parts in experts.items():
        n = cfg.text.n_routed_experts
        missing = [(e, p) for e in range(n) for p in ("gate_proj", "up_proj", "down_proj") if (e, p) not in parts]
        if missing:
            raise ValueError(f"release experts {base}: missing projections {missing[:4]}")
        stacked = text_prefix + base[len("model.") :]
        gate_up = [torch.cat([parts[(e, "gate_proj")][0], parts[(e, "up_proj")][0]], 0) for e in range(n)]
        state[f"{stacked}.gate_up_proj"] = torch.stack(gate_up)
        state[f"{stacked}.down_proj"] = torch.stack([parts[(e, "down_proj")][0] for e in range(n)])
        if parts[(0, "gate_proj")][1] is not None:
            for leaf, projs in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
                q = torch.stack([torch.cat([parts[(e, p)][1][0] for p in projs], 0) for e in range(n)])
                s = torch.stack([torch.cat([parts[(e, p)][1][1] for p in projs], 0) for e in range(n)])
                int4[f"{stacked}.{leaf}"] = (q, s)
    return state, int4


def hf_model_from_release(path: str | os.PathLike):
    """A float32, eager-attention transformers model holding exactly a release directory's weights.

    ``Kimi_K25ForConditionalGeneration`` when the config has a vision tower, else ``DeepseekV3ForCausalLM``; the
    config from ``config.json`` (:func:`~k25jax.release.config.from_release_config`, then the same transformers
    kwargs as :func:`make_hf_kimi_model` / :func:`make_hf_text_model`); routed experts decoded with
    compressed-tensors' ``unpack_from_int32`` and ``dequantize`` (transformers' own INT4 loader does not read
    this per-expert layout). ``model._k25_int4`` holds the decoded ``(q, scale)``, so :func:`release_tensors` of
    the model gives the release's tensors back.
    """
    from k25jax.release.config import from_release_config

    path = os.fspath(path)
    cfg = from_release_config(path)
    kimi = cfg.vision is not None
    model = make_hf_kimi_model(cfg) if kimi else make_hf_text_model(cfg)
    state, int4 = hf_state_from_release(read_release_tensors(path), cfg, _release_qargs(path), kimi=kimi)
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state))
    unknown = sorted(set(state) - set(ours))
    if missing or unknown:
        raise ValueError(f"{path}: transformers tensors missing from the release {missing[:5]}, unknown {unknown[:5]}")
    for name, value in state.items():
        if tuple(value.shape) != tuple(ours[name].shape):
            raise ValueError(
                f"{path}: {name} has shape {tuple(value.shape)}, transformers wants {tuple(ours[name].shape)}"
            )
    model.load_state_dict(state, strict=True)
    model._k25_int4 = int4
    return model
