"""Calibration data built for a model (``bayesq-onnx calib``): from text and a tokenizer, from a folder
of images, or random but valid.  Whatever the source, the result is checked against the model's
input names, dtypes and shapes exactly as ``compress --calib`` checks it."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..errors import BayesQError, first_line, require
from .readers import InputSpec, _gather_vocab, check_calibration, fixed_batch, input_specs, synthetic_calibration

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DEFAULT_SEQ_LEN = 64   # for models whose sequence axis is dynamic


@dataclass(frozen=True)
class ImageOptions:
    size: tuple[int, int] | None = None      # (H, W); required when the model's are dynamic
    crop: bool = False                       # resize the shorter side, then crop the centre (else stretch)
    mean: tuple[float, ...] = (0.0,)         # per channel (or one for all), on the [0, 1] scale
    std: tuple[float, ...] = (1.0,)


def random_calibration(model: onnx.ModelProto, samples: int, seed: int) -> dict[str, np.ndarray]:
    """The compressor's own synthetic fallback (``readers.synthetic_calibration``), saved."""
    specs = input_specs(model)
    return check_calibration(synthetic_calibration(model, specs, samples, seed), specs, "random calibration data")


def text_calibration(model: onnx.ModelProto, text: str | Path, tokenizer: str | Path, samples: int,
                     seq_len: int | None = None) -> dict[str, np.ndarray]:
    """One sample per non-empty line of ``text``, tokenized with ``tokenizer`` (a ``tokenizer.json``),
    truncated or padded to the sequence length (the model's, when fixed; else ``seq_len``, default
    DEFAULT_SEQ_LEN).  Inputs are filled by name: ``*ids*`` the token ids, ``*mask*`` the attention
    mask, ``*type*`` / ``*segment*`` zeros, ``*position*`` 0, 1, ..."""
    specs = input_specs(model)
    roles = {s.name: _text_role(s) for s in specs}
    ids_inputs = [n for n, r in roles.items() if r == "ids"]
    if len(ids_inputs) != 1:
        raise BayesQError(f"text calibration needs exactly one token-id input (a name containing 'ids'); the "
                          f"model's inputs are {[s.name for s in specs]}")
    length = _seq_len(specs, seq_len)
    tokenizers = require("tokenizers", "pip install tokenizers", "text calibration")
    try:
        tok = tokenizers.Tokenizer.from_file(str(tokenizer))
    except Exception as e:
        raise BayesQError(f"cannot read tokenizer {tokenizer}: {first_line(e)}") from None
    try:
        lines = [ln.strip() for ln in Path(text).read_text(encoding="utf-8").splitlines()]
    except FileNotFoundError:
        raise BayesQError(f"text file not found: {text}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BayesQError(f"cannot read text file {text}: {first_line(e)}") from None
    lines = [ln for ln in lines if ln][:samples]
    if not lines:
        raise BayesQError(f"text file {text} has no non-empty lines")
    tok.enable_truncation(max_length=length)
    tok.enable_padding(length=length, pad_id=_pad_id(tok))
    enc = tok.encode_batch(lines)
    ids = np.array([e.ids for e in enc], np.int64)
    mask = np.array([e.attention_mask for e in enc], np.int64)
    vocab = _gather_vocab(model).get(ids_inputs[0])
    if vocab is not None and ids.max() >= vocab:
        raise BayesQError(f"the tokenizer gives token ids up to {ids.max()}, but the model's embedding has "
                          f"{vocab} rows: is it this model's tokenizer?")
    fill = {"ids": ids, "mask": mask, "zeros": np.zeros_like(ids),
            "positions": np.broadcast_to(np.arange(length), ids.shape)}
    data = {s.name: _cast(fill[roles[s.name]], s) for s in specs}
    return check_calibration(_whole_batches(data, specs), specs, f"calibration data from {text}")


def image_calibration(model: onnx.ModelProto, folder: str | Path, samples: int,
                      opts: ImageOptions = ImageOptions()) -> dict[str, np.ndarray]:
    """The first ``samples`` images of ``folder`` (by file name) as one NCHW float input: converted to
    the model's channels (1: grey, 3: RGB), resized, scaled to [0, 1], then ``(x - mean) / std``."""
    specs = input_specs(model)
    if len(specs) != 1 or specs[0].dtype.kind != "f" or len(specs[0].shape) != 4:
        raise BayesQError("image calibration needs a model with one float input of shape (N, C, H, W); its inputs "
                          f"are {[(s.name, str(s.dtype), _shape_text(s.shape)) for s in specs]}")
    spec = specs[0]
    channels, h, w = spec.shape[1:]
    if channels not in (1, 3):
        raise BayesQError(f"input {spec.name!r} has {channels} channels: images give 1 (grey) or 3 (RGB)")
    if h is not None and w is not None:
        if opts.size is not None and opts.size != (h, w):
            raise BayesQError(f"--size {opts.size[0]}x{opts.size[1]}: the model's input {spec.name!r} is fixed at "
                              f"{h}x{w}")
        size = (h, w)
    elif opts.size is None:
        raise BayesQError(f"the model's input {spec.name!r} has dynamic height or width: give --size HxW")
    else:
        size = opts.size
    mean, std = _per_channel(opts.mean, channels, "--mean"), _per_channel(opts.std, channels, "--std")
    if np.any(std <= 0):
        raise BayesQError("--std must be positive")
    folder = Path(folder)
    if not folder.is_dir():
        raise BayesQError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:samples]
    if not files:
        raise BayesQError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    image = require("PIL.Image", "pip install pillow", "image calibration")
    x = np.stack([_load_image(image, f, channels, size, opts.crop) for f in files])
    x = ((x - mean[:, None, None]) / std[:, None, None]).astype(spec.dtype)
    return check_calibration(_whole_batches({spec.name: x}, specs), specs, f"calibration data from {folder}")


def _load_image(image, path: Path, channels: int, size: tuple[int, int], crop: bool) -> np.ndarray:
    h, w = size
    try:
        with image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if crop:   # shorter side to the target, then the centre
                s = max(h / im.height, w / im.width)
                im = im.resize((max(w, round(im.width * s)), max(h, round(im.height * s))), image.BILINEAR)
                left, top = (im.width - w) // 2, (im.height - h) // 2
                im = im.crop((left, top, left + w, top + h))
            else:
                im = im.resize((w, h), image.BILINEAR)
            a = np.asarray(im, np.float32) / 255.0
    except Exception as e:
        raise BayesQError(f"cannot read image {path}: {first_line(e)}") from None
    return a[None] if channels == 1 else a.transpose(2, 0, 1)


def _per_channel(values, channels: int, flag: str) -> np.ndarray:
    v = np.asarray(values, np.float32)
    if v.size == 1:
        return np.full(channels, v.item(), np.float32)
    if v.size != channels:
        raise BayesQError(f"{flag} has {v.size} values, the model's images have {channels} channels")
    return v


def _text_role(s: InputSpec) -> str:
    n = s.name.lower()
    if s.dtype.kind not in "iub":
        raise BayesQError(f"input {s.name!r} is {s.dtype}: text calibration fills integer inputs only")
    for key, role in (("mask", "mask"), ("type", "zeros"), ("segment", "zeros"), ("position", "positions"),
                      ("ids", "ids")):
        if key in n:
            return role
    raise BayesQError(f"cannot fill input {s.name!r} from text (known: *ids*, *mask*, *type*, *segment*, "
                      "*position*)")


def _seq_len(specs: list[InputSpec], seq_len: int | None) -> int:
    fixed = {s.shape[1] for s in specs if len(s.shape) >= 2 and s.shape[1] is not None}
    if any(len(s.shape) != 2 for s in specs):
        raise BayesQError("text calibration fills (batch, sequence) inputs; the model's are "
                          + ", ".join(f"{s.name} {_shape_text(s.shape)}" for s in specs))
    if len(fixed) > 1:
        raise BayesQError(f"the model's inputs have different sequence lengths {sorted(fixed)}")
    if fixed:
        (length,) = fixed
        if seq_len is not None and seq_len != length:
            raise BayesQError(f"--seq-len {seq_len}: the model's sequence length is fixed at {length}")
        return length
    if seq_len is not None and seq_len < 1:
        raise BayesQError(f"--seq-len must be >= 1, got {seq_len}")
    return seq_len or DEFAULT_SEQ_LEN


def _pad_id(tok) -> int:
    if tok.padding and tok.padding.get("pad_id") is not None:
        return int(tok.padding["pad_id"])
    for t in ("[PAD]", "<pad>", "<|padding|>", "<|endoftext|>", "</s>"):
        i = tok.token_to_id(t)
        if i is not None:
            return i
    return 0   # masked out anyway


def _cast(a: np.ndarray, s: InputSpec) -> np.ndarray:
    return np.ascontiguousarray(a).astype(s.dtype)


def _whole_batches(data: dict[str, np.ndarray], specs: list[InputSpec]) -> dict[str, np.ndarray]:
    """A model with a fixed batch size takes whole batches only: the rest is dropped (with a note)."""
    unit = fixed_batch(specs)
    n = len(next(iter(data.values())))
    if unit and n % unit:
        if n < unit:
            raise BayesQError(f"the model runs in fixed batches of {unit}: {n} samples are too few")
        log.warning("the model runs in fixed batches of %d: keeping %d of %d samples", unit, n - n % unit, n)
        data = {k: v[:n - n % unit] for k, v in data.items()}
    return data


def _shape_text(shape) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"
