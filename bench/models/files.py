"""Checks on a checkpoint's files that every family shares, run before anything is loaded: JSON
configs that are JSON objects, safetensors files whose header and data are whole, sharded
checkpoints whose index names only shards that exist, weights that are safetensors (pickle files
are never loaded), and the tokenizer and image-processor files. Each failure is a UsageError
naming the file and what to do."""
from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

from bench.errors import UsageError

INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                  "vocab.json")
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_HEADER = 100 * 2**20  # the safetensors library's own limit


def read_json_object(file: Path, what: str) -> dict:
    """The JSON object in `file`, or a UsageError saying why it is not one."""
    try:
        raw = file.read_bytes()
    except OSError as e:
        raise UsageError(f"{what}: cannot read {file} ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{what}: {file} is not UTF-8 text; restore the checkpoint's original file") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{what}: {file} is not valid JSON ({e}); restore the checkpoint's original file") from None
    except RecursionError:
        raise UsageError(f"{what}: {file} is JSON nested too deep; restore the checkpoint's original file") from None
    if not isinstance(data, dict):
        raise UsageError(f"{what}: {file} holds a JSON {type(data).__name__ if data is not None else 'null'}, "
                         "not an object; restore the checkpoint's original file")
    return data


def _broken(file: Path, what: str, why: str) -> UsageError:
    return UsageError(f"{what}: {file} is not a valid safetensors file ({why}); re-download or re-convert it")


def safetensors_header(file: Path, what: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} from the header of `file`, after checking that the header is
    whole and that every tensor's bytes lie inside the file."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _broken(file, what, f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > MAX_HEADER or 8 + n > size:
                raise _broken(file, what, f"header length {n} does not fit in {size} bytes (truncated or not "
                                          "safetensors)")
            raw = f.read(n)
    except OSError as e:
        raise UsageError(f"{what}: cannot read {file} ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise _broken(file, what, "the header is not JSON") from None
    if not isinstance(header, dict):
        raise _broken(file, what, "the header is not a JSON object")
    data = size - 8 - n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            width = DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError):
            raise _broken(file, what, f"bad header entry for {name!r}") from None
        if not (0 <= begin <= end <= data):
            raise _broken(file, what, f"tensor {name!r} ends at byte {end} of {data} data bytes (truncated)")
        if end - begin != math.prod(shape) * width:
            raise _broken(file, what, f"tensor {name!r} has {end - begin} bytes for shape {list(shape)} {dtype}")
        out[name] = (dtype, shape)
    return out


def weight_files(folder: Path, what: str) -> list[Path]:
    """The safetensors files holding a model's weights in `folder`, checked: a sharded checkpoint's
    index must be a JSON object whose every shard exists; pickle-only weights are refused."""
    index = folder / INDEX
    if index.exists():
        data = read_json_object(index, what)
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UsageError(f"{what}: {index} has no weight_map; restore the checkpoint's original file")
        shards = sorted(set(str(v) for v in weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise UsageError(f"{what}: shard {folder / missing[0]} listed in {INDEX} is missing"
                             f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; download every shard")
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
    if pickles:
        raise UsageError(f"{what}: {folder} has only pickle weights ({', '.join(pickles[:3])}), which are never "
                         "loaded (they can run code); convert them to safetensors")
    raise UsageError(f"{what}: no *.safetensors weights in {folder} (only safetensors are loaded)")


def checked_weights(folder: Path, what: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor of the model in `folder` ({name: (dtype, shape)}), each file's header checked;
    with an index, every tensor it lists must be in the shard it names."""
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    files = weight_files(folder, what)
    for file in files:
        tensors.update(safetensors_header(file, what))
    index = folder / INDEX
    if index.exists():
        listed = read_json_object(index, what)["weight_map"]
        absent = [k for k in listed if k not in tensors]
        if absent:
            raise UsageError(f"{what}: tensor {absent[0]!r} listed in {index} is in no shard; re-download the "
                             "checkpoint")
    return tensors


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2")


def check_weight_dtype(name: str, dtype: str, what: str, where: Path) -> None:
    """A model weight or bias is stored as floating point (an integer one would be cast to float
    on load without a word: its values are not the model's)."""
    if name.endswith((".weight", ".bias")) and dtype not in FLOAT_DTYPES:
        raise UsageError(f"{what}: tensor {name!r} in {where} is stored as {dtype}, not floating point; the "
                         "weights are corrupt or of another format: re-download or re-convert the checkpoint")


def check_shapes(tensors: dict[str, tuple[str, tuple[int, ...]]], expected: dict[str, tuple[int, ...]],
                 what: str, where: Path) -> None:
    """Every tensor in `expected` is in `tensors` with that shape, a weight in floating point."""
    for name, shape in expected.items():
        if name not in tensors:
            raise UsageError(f"{what}: tensor {name!r} is missing from {where}; the checkpoint is incomplete")
        check_weight_dtype(name, tensors[name][0], what, where)
        if tuple(tensors[name][1]) != tuple(shape):
            raise UsageError(f"{what}: tensor {name!r} in {where} has shape {list(tensors[name][1])}, the config "
                             f"implies {list(shape)}; the weights do not belong to this config.json")


def one_line(e: BaseException, limit: int = 200) -> str:
    """An exception's message squeezed onto one line."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def named_tokenizer(path: Path, what: str, classes: tuple[tuple[str, type], ...]):
    """The tokenizer of the first (file name, tokenizer class) of `classes` whose file `path`
    holds, loaded by that class: families whose config.json AutoTokenizer must not read (its
    auto_map names the checkpoint's own code, or its model_type is one transformers lacks)."""
    for name, cls in classes:
        if (path / name).is_file():
            try:
                return cls.from_pretrained(path, trust_remote_code=False)
            except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exception
                raise UsageError(f"{what}: cannot load the tokenizer in {path / name} ({one_line(e)})") from None
    names = " or ".join(name for name, _ in classes)
    raise UsageError(f"{what}: no {names} in {path}; copy them from the original checkpoint")


def require_tokenizer(folder: Path, what: str) -> None:
    """Tokenizer files with a vocabulary are there (a tokenizer_config.json alone loads as a
    tokenizer of its added tokens only), those that are JSON are JSON objects, and a SentencePiece
    tokenizer.model that is the vocabulary (no tokenizer.json beside it) is one."""
    vocab = [f for f in TOKENIZER_FILES if f != "tokenizer_config.json"]
    if not any((folder / f).is_file() for f in vocab):
        raise UsageError(f"{what}: no tokenizer vocabulary in {folder} (expected one of {', '.join(vocab)}); "
                         "copy them from the original checkpoint")
    for name in TOKENIZER_JSON:
        if (folder / name).is_file():
            read_json_object(folder / name, what)
    if not (folder / "tokenizer.json").is_file() and (folder / "tokenizer.model").is_file():
        _require_sentencepiece(folder / "tokenizer.model", what)


def _require_sentencepiece(file: Path, what: str) -> None:
    """A usage error unless `file` is a serialized SentencePiece model with pieces (transformers
    takes an empty one for a tokenizer without a vocabulary, and other bytes for a tiktoken file)."""
    try:
        from google.protobuf.message import DecodeError
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:  # then transformers cannot read it either, and says so
        return
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(file.read_bytes())
    except (DecodeError, OSError):
        proto.Clear()
    if not len(proto.pieces):
        raise UsageError(f"{what}: {file} is not a SentencePiece model (no vocabulary in it); restore the "
                         "checkpoint's original file")


def require_preprocessor(folder: Path, what: str) -> None:
    """preprocessor_config.json is a JSON object whose image sizes (size, crop_size) are positive
    and within the limit image files are held to (PIL's decompression-bomb limit): a processor
    told to resize to 60000x60000 would take minutes and tens of GB per image."""
    from PIL import Image

    file = folder / "preprocessor_config.json"
    if not file.is_file():
        raise UsageError(f"{what}: no preprocessor_config.json in {folder}; copy it from the original checkpoint")
    config = read_json_object(file, what)
    for key in ("size", "crop_size"):
        value = config.get(key)
        sides = value.values() if isinstance(value, dict) else [value]
        for side in (s for s in sides if isinstance(s, (int, float)) and not isinstance(s, bool)):
            if side <= 0 or side * side > (Image.MAX_IMAGE_PIXELS or float("inf")):
                raise UsageError(f"{what}: {file} asks for images of side {side} ({key}), not a usable size (at "
                                 f"most {Image.MAX_IMAGE_PIXELS:,} pixels); restore the checkpoint's original file")


# Sizes a model config gives as whole numbers above zero, and numbers that must be finite and
# above zero, wherever they appear in a config (its text, vision and language-model parts too).
POSITIVE_INTS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "vocab_size", "max_position_embeddings", "head_dim", "image_size",
                 "patch_size", "mm_hidden_size", "force_image_size")
POSITIVE_NUMBERS = ("rms_norm_eps", "layer_norm_eps", "rope_theta", "downsample_ratio")


def check_config_values(config: dict, what: str, file: Path) -> None:
    """A usage error when a config (or a config nested in it) gives a size that is not a whole
    number above zero, or an epsilon or RoPE base that is not a finite number above zero (a NaN
    or negative value in config.json builds a model that computes garbage or cannot be built), or
    architectures that are not a list of class names (the families' layout checks look in it)."""
    def bad(key, value, kind):
        raise UsageError(f"{what}: {file} gives {key} = {value!r}, not {kind}; restore the checkpoint's "
                         "original file")

    for key, value in config.items():
        if key == "architectures" and value is not None and not (
                isinstance(value, list) and all(isinstance(n, str) for n in value)):
            bad(key, value, "a list of class names")
        if isinstance(value, dict):
            check_config_values(value, what, file)
        elif value is None or isinstance(value, (list, str)):
            continue
        elif key in POSITIVE_INTS and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            bad(key, value, "a whole number above zero")
        elif key in POSITIVE_NUMBERS and (isinstance(value, bool) or not isinstance(value, (int, float))
                                          or not 0 < value < math.inf):
            bad(key, value, "a finite number above zero")


def check_architectures(config: dict, accepted: tuple[str, ...], layout: str, what: str, file: Path) -> None:
    """config.json's "architectures" (when it says; a list of class names, check_config_values)
    names a model class of the layout it was found to be: weights of another model in a familiar
    layout are refused, not loaded into this one."""
    names = config.get("architectures")
    if names is None or not accepted:
        return
    if names and not set(names) & set(accepted):
        raise UsageError(f"{what}: {file} names architectures {', '.join(names)}, but a checkpoint in the "
                         f"{layout} is {' or '.join(accepted)}; give a checkpoint of a supported model")


LAYER_INDEX = re.compile(r"\.layers?\.(\d+)\.")


def check_layer_counts(configs, names, what: str, where: Path) -> None:
    """No config claims more layers than the weights hold (their names' largest `.layers.N.`),
    checked before a model is built from the config to list the tensors it implies: building a
    billion layers, even on the meta device, would not finish."""
    held = 1 + max((int(m.group(1)) for n in names if (m := LAYER_INDEX.search(n))), default=-1)
    for config in configs:
        layers = getattr(config, "num_hidden_layers", None)
        if isinstance(layers, int) and layers > held:
            raise UsageError(f"{what}: {where / 'config.json'} says num_hidden_layers={layers} but the weights hold "
                             f"{held} layers; the weights do not belong to this config.json")


def check_feature_layer(value, layers, key: str, what: str, where: Path) -> None:
    """`value` (the config's `key`) names one of the vision tower's `layers` + 1 hidden states:
    an integer from -(layers + 1) to layers (the adapters index the hidden states with it, so a
    list, which transformers takes for some families, is refused too); a request indexing past
    them failed at its first image (IndexError), or at every one, with a list at every one
    (TypeError)."""
    if not isinstance(layers, int) or isinstance(layers, bool):
        return
    if isinstance(value, bool) or not isinstance(value, int) or not -(layers + 1) <= value <= layers:
        raise UsageError(f"{what}: {where / 'config.json'}: {key}={value!r} is not a layer of the vision tower's "
                         f"{layers} (an integer from {-(layers + 1)} to {layers}; -2: the second-to-last); restore "
                         "the checkpoint's original file")


def check_awq_tensors(tensors: dict[str, tuple[str, tuple[int, ...]]], group_size: int, what: str,
                      where: Path) -> None:
    """AutoAWQ GEMM layout: each quantized linear has qweight [K, N/8], qzeros [K/G, N/8] (int32)
    and scales [K/G, N], G the config's group size."""
    for key, (_, qshape) in tensors.items():
        if not key.endswith(".qweight"):
            continue
        name = key[: -len(".qweight")]
        zeros, scales = tensors.get(f"{name}.qzeros"), tensors.get(f"{name}.scales")
        if zeros is None or scales is None:
            raise UsageError(f"{what}: {name} has a qweight but no {'qzeros' if zeros is None else 'scales'} in "
                             f"{where}; the AWQ checkpoint is incomplete")
        ok = len(qshape) == 2 and len(zeros[1]) == 2 and len(scales[1]) == 2 and group_size > 0
        if ok:
            k, n8 = qshape
            groups = k // group_size
            ok = (k % group_size == 0 and zeros[1] == (groups, n8) and scales[1] == (groups, n8 * 8))
        if not ok:
            raise UsageError(f"{what}: AWQ tensors of {name} in {where} have inconsistent shapes (qweight "
                             f"{list(qshape)}, qzeros {list(zeros[1])}, scales {list(scales[1])}, group size "
                             f"{group_size}); re-download or re-quantize the checkpoint")
