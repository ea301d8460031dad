"""Llama-family safetensors -> GGUF (f32, f16, bf16), one tensor at a time.

Built from gguf-py's own blocks (GGUFWriter, the tensor name map, the constants). Why not
llama.cpp's convert_hf_to_gguf.py: it rejects NorMistral's tokenizer ("BPE pre-tokenizer was
not recognized"). The tensor layout follows its Llama conversion, including the Q/K row
permutation that llama.cpp's RoPE expects.

Memory: tensor infos are written first from the safetensors headers, then each tensor is read
with plain file reads, converted and written before the next is touched, so peak RSS is
bounded by the largest tensor (the 51,200 x 5,120 embedding: 500 MiB in bf16), not the model.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm.auto import tqdm

from kvant.errors import ModelError
from kvant.export.gguf_tokenizer import add_tokenizer
from kvant.model import raw_header, read_safetensors_header, read_tensor, rope_theta, weight_files
from kvant.paths import looks_like_hub_id

logger = logging.getLogger(__name__)

# Types written directly; everything else comes from llama.cpp's quantizer on the bf16 file.
DIRECT_TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"),
                "bf16": ("BF16", "MOSTLY_BF16")}


def permute_qk(weight, n_head: int):
    """Reorder Q/K rows from HF's rotate-half RoPE to llama.cpp's interleaved pairs.

    (n_head * head_dim, in) -> same shape; as LlamaModel.permute in convert_hf_to_gguf.py.
    """
    rows = weight.shape[0]
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def unpermute_qk(weight, n_head: int):
    """The inverse of :func:`permute_qk`: llama.cpp's Q/K row order back to HF's."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _plan(model_dir: Path, config: dict, out_type: str):
    """[(gguf name, hf name, shape, ggml type)] and the tensors left out, from headers only."""
    n_layers = config["num_hidden_layers"]
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    qtype = gguf.GGMLQuantizationType[DIRECT_TYPES[out_type][0]]
    plan, skipped = [], []
    names = []
    for file in weight_files(model_dir):
        names += [(n, spec) for n, spec in read_safetensors_header(file).items()]
    for hf_name, spec in names:
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            skipped.append(hf_name)
            continue
        # norms stay f32, as llama.cpp's converter does (they are tiny and precision-critical)
        ttype = qtype if len(spec["shape"]) == 2 else gguf.GGMLQuantizationType.F32
        plan.append((gguf_name, hf_name, spec["shape"], ttype))
    if not any(p[0] == "output.weight" for p in plan):
        if not config.get("tie_word_embeddings", False):
            raise ModelError(f"'{model_dir}' has no lm_head.weight and untied embeddings")
    return plan, skipped


def _as_numpy(tensor, ttype):
    """A torch tensor as the numpy array of the GGML type's bytes."""
    if ttype == gguf.GGMLQuantizationType.BF16:
        return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view("<u2")
    if ttype == gguf.GGMLQuantizationType.F16:
        return tensor.to(torch.float16).contiguous().numpy()
    return tensor.to(torch.float32).contiguous().numpy()


def add_hparams(writer, config: dict, file_type, context_length: int = 0) -> None:
    """Every hyperparameter llama.cpp's llama architecture reads."""
    n_head = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    writer.add_context_length(context_length or config.get("max_position_embeddings", 32768))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads", n_head))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write(writer, model_dir: Path, config: dict, plan: list, out_type: str,
           progress: bool) -> None:
    """Header, metadata, tensor table, then each tensor, read and written one at a time."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads", n_head)
    locations = {}
    for file in weight_files(model_dir):
        locations.update(dict.fromkeys(raw_header(file)[1], file))
    for _, hf_name, _, ttype in tqdm(plan, desc=f"GGUF {out_type}", disable=not progress):
        tensor = read_tensor(locations[hf_name], hf_name)
        if hf_name.endswith("q_proj.weight"):
            tensor = permute_qk(tensor, n_head)
        elif hf_name.endswith("k_proj.weight"):
            tensor = permute_qk(tensor, n_kv)
        writer.write_tensor_data(_as_numpy(tensor, ttype))
        del tensor


def general_metadata(model_dir: Path, model_id: str, n_params: int) -> gguf.Metadata:
    """The general.* keys llama.cpp's own converter writes, from gguf-py's Metadata: name,
    basename, finetune, size label and organization from the model id (a hub id such as
    norallm/normistral-11b-long, or a folder name), licence, languages, tags and base model
    from the model card's front matter; quantized_by Kvant, and the source model's hub page
    where the model came from the hub. The Hub, LM Studio and llama.cpp show these."""
    card = gguf.Metadata.load_model_card(model_dir)
    meta = gguf.Metadata.apply_metadata_heuristic(gguf.Metadata(), card,
                                                  {"_name_or_path": model_id}, None, n_params)
    meta.name = meta.name or model_id
    meta.size_label = meta.size_label or gguf.size_label(n_params, 0, 0, 0)
    meta.quantized_by = "Kvant"
    if looks_like_hub_id(model_id) and "/" in model_id:
        meta.url = meta.source_repo_url = f"https://huggingface.co/{model_id}"
    return meta


def write_vocab_only(model_dir: Path, out_file: Path, pre: str = "ufakzeka") -> dict:
    """A GGUF with the hyperparameters and tokenizer and no tensors, as llama.cpp's
    `convert_hf_to_gguf.py --vocab-only` writes for its tokenizer tests (models/ggml-vocab-*)."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    writer = gguf.GGUFWriter(str(out_file), "llama")
    general_metadata(model_dir, model_dir.name, 0).set_gguf_meta_model(writer)
    add_hparams(writer, config, gguf.LlamaFileType.ALL_F32)
    tokenizer = add_tokenizer(writer, model_dir, pre)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return tokenizer


def convert(model_dir: Path, out_file: Path, out_type: str = "bf16", pre: str = "ufakzeka",
            name: str = "", progress: bool = False, context_length: int = 0,
            model_id: str = "") -> dict:
    """Write ``out_file`` as a GGUF of ``out_type`` (f32, f16 or bf16); return a summary.

    ``model_id``: the hub id (or name) the general.* metadata is derived from (default
    ``name``). ``context_length``: what llama.cpp reads as the trained context (default:
    config.json's max_position_embeddings); llama.cpp tools that size their context from the
    model allocate a KV cache of that many tokens.

    >>> convert(Path("normistral-11b-long"), Path("nm-BF16.gguf"))  # doctest: +SKIP
    """
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    plan, skipped = _plan(model_dir, config, out_type)
    file_type = gguf.LlamaFileType[DIRECT_TYPES[out_type][1]]
    writer = gguf.GGUFWriter(str(out_file), "llama")
    n_params = sum(int(np.prod(shape)) for _, _, shape, _ in plan)
    general_metadata(model_dir, model_id or name or model_dir.name,
                     n_params).set_gguf_meta_model(writer)
    add_hparams(writer, config, file_type, context_length)
    tokenizer = add_tokenizer(writer, model_dir, pre)
    for gguf_name, _, shape, ttype in plan:
        itemsize = 4 if ttype == gguf.GGMLQuantizationType.F32 else 2
        n_elements = int(np.prod(shape))
        writer.add_tensor_info(gguf_name, shape, np.dtype("float32" if itemsize == 4 else
                                                          "float16"), n_elements * itemsize,
                               raw_dtype=ttype)
    try:
        _write(writer, model_dir, config, plan, out_type, progress)
    except BaseException:
        # release the file even when the disk is full (closing flushes, which fails again)
        with contextlib.suppress(Exception):
            writer.close()
        raise
    writer.close()
    if skipped:
        logger.warning("left out tensors llama.cpp does not use: %s", ", ".join(skipped))
    return {"type": out_type, "tensors": len(plan), "skipped_tensors": skipped,
            "tokenizer": tokenizer, "n_params": n_params}
