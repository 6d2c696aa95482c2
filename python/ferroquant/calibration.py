"""Calibration data: texts, files, ``datasets.Dataset`` rows or token tensors -> a
:class:`CalibrationSet` of ``[1, L]`` token windows.

Text sources are tokenized document by document without special tokens and joined into one
stream with the tokenizer's EOS id between documents (when it has one). Windows are then taken
from the stream:

* ``mode="chunk"`` (default): consecutive non-overlapping windows from the start of the stream,
  so the result is deterministic and uses each token once. When the stream holds fewer than
  ``num_samples`` full windows, its remainder becomes one last, shorter sample.
* ``mode="random"``: ``num_samples`` windows at uniformly random offsets (``seed``), the GPTQ
  paper's sampling; windows may overlap when the stream is short.

``add_bos=None`` (default) prepends the BOS token to each window when the tokenizer itself adds
one to ordinary text (Llama, Gemma...), so the block inputs look like real prompts; the window
then holds ``seq_len - 1`` text tokens. Padding never reaches the pipeline: every sample is a
contiguous run of real tokens and its attention mask is all ones.

Too little data is not an error: a ``UserWarning`` names the token count obtained and the count
asked for (``num_samples * seq_len``).

The project's default calibration file for examples and benchmarks is
``../shared/data/text/c4_calibration.jsonl`` (relative to the repository; see
:data:`DEFAULT_CALIBRATION_FILE`).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .models import shared_data_root

__all__ = [
    "DEFAULT_CALIBRATION_FILE",
    "CalibrationSet",
    "from_dataset",
    "from_file",
    "from_tensors",
    "from_texts",
]

# The real C4 sample beside the repository (never committed to it).
DEFAULT_CALIBRATION_FILE = shared_data_root() / "text" / "c4_calibration.jsonl"

Mode = Literal["chunk", "random"]


@dataclass
class CalibrationSet:
    """Token windows for calibration: ``input_ids[i]`` and ``attention_mask[i]`` are ``[1, L_i]``
    int64 tensors (``L_i <= seq_len``; all windows are full length unless data ran short)."""

    input_ids: list[torch.Tensor]
    attention_mask: list[torch.Tensor]
    seq_len: int
    requested_samples: int
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.attention_mask):
            raise ValueError("CalibrationSet: input_ids and attention_mask differ in length")
        for i, (ids, m) in enumerate(zip(self.input_ids, self.attention_mask)):
            if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape != m.shape:
                raise ValueError(f"CalibrationSet: sample {i} must be [1, L] with a mask of the "
                                 f"same shape, got {list(ids.shape)} and {list(m.shape)}")

    def __len__(self) -> int:
        return len(self.input_ids)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for ids, m in zip(self.input_ids, self.attention_mask):
            yield {"input_ids": ids, "attention_mask": m}

    @property
    def num_tokens(self) -> int:
        """Real (unmasked) tokens over all samples."""
        return int(sum(int(m.sum()) for m in self.attention_mask))

    def __repr__(self) -> str:
        return (f"CalibrationSet({len(self)} samples, {self.num_tokens} tokens, "
                f"seq_len={self.seq_len}, source={self.source!r})")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _check_sizes(num_samples: int, seq_len: int) -> None:
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")


def _wants_bos(tokenizer: Any, add_bos: bool | None) -> int | None:
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos is False:
        return None
    if add_bos is True:
        if bos is None:
            raise ValueError("add_bos=True but the tokenizer has no bos_token_id")
        return int(bos)
    if bos is None:
        return None
    try:  # does the tokenizer put BOS in front of ordinary text by itself?
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    except Exception:  # noqa: BLE001 - any tokenizer failure just means "no BOS"
        return None
    return int(bos) if len(ids) > 0 and ids[0] == bos else None


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _warn_short(got: int, asked: int, source: str) -> None:
    if got < asked:
        warnings.warn(
            f"calibration data from {source} gave {got} tokens, fewer than the {asked} asked "
            f"for (num_samples * seq_len); quantization quality may suffer - add more text "
            f"or lower num_samples/seq_len",
            UserWarning,
            stacklevel=4,
        )


def _windows(stream: torch.Tensor, num_samples: int, seq_len: int, seed: int, mode: Mode,
             bos: int | None) -> list[torch.Tensor]:
    """Windows of ``seq_len`` tokens (BOS included when given) from a 1-D stream."""
    body = seq_len - 1 if bos is not None else seq_len
    n = stream.numel()
    out: list[torch.Tensor] = []
    if mode == "chunk":
        for i in range(num_samples):
            piece = stream[i * body:(i + 1) * body]
            if piece.numel() == 0:
                break
            # a tail of a single token calibrates nothing useful (no context); drop it
            if piece.numel() < body and out and piece.numel() < 2:
                break
            out.append(piece)
            if piece.numel() < body:
                break
    elif mode == "random":
        if n <= body:
            out.append(stream.clone())
        else:
            g = torch.Generator().manual_seed(int(seed))
            starts = torch.randint(0, n - body + 1, (num_samples,), generator=g)
            out = [stream[s:s + body] for s in starts.tolist()]
    else:
        raise ValueError(f"mode must be 'chunk' or 'random', got {mode!r}")
    if bos is not None:
        out = [torch.cat([piece.new_tensor([bos]), piece]) for piece in out]
    return [w.reshape(1, -1).clone() for w in out]


def _build(stream: torch.Tensor, *, num_samples: int, seq_len: int, seed: int, mode: Mode,
           bos: int | None, source: str, n_docs: int) -> CalibrationSet:
    if stream.numel() == 0:
        raise ValueError(f"calibration data from {source} produced no tokens")
    wins = _windows(stream, num_samples, seq_len, seed, mode, bos)
    cs = CalibrationSet(
        input_ids=wins,
        attention_mask=[torch.ones_like(w) for w in wins],
        seq_len=seq_len,
        requested_samples=num_samples,
        source=source,
        meta={"mode": mode, "seed": seed, "documents": n_docs, "stream_tokens": stream.numel(),
              "bos": bos},
    )
    if mode == "random":
        # random windows re-use tokens when the stream is short; count distinct ones
        got = min(stream.numel() + (len(wins) if bos is not None else 0), cs.num_tokens)
    else:
        got = cs.num_tokens
    _warn_short(got, num_samples * seq_len, source)
    return cs


def _stream_from_texts(texts: Iterable[str], tokenizer: Any, need: int | None, source: str
                       ) -> tuple[torch.Tensor, int]:
    """Token stream of the documents joined by EOS; stops once ``need`` tokens are there."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    n_docs = 0
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"calibration data from {source}: item {i} is "
                            f"{type(t).__name__}, expected str")
        if not t.strip():
            continue
        if ids and eos is not None:
            ids.append(int(eos))
        ids.extend(_encode(tokenizer, t))
        n_docs += 1
        if need is not None and len(ids) >= need:
            break
    return torch.tensor(ids, dtype=torch.long), n_docs


# --------------------------------------------------------------------------------------------
# public constructors
# --------------------------------------------------------------------------------------------


def from_texts(texts: Iterable[str] | str, tokenizer: Any, num_samples: int = 128,
               seq_len: int = 2048, seed: int = 0, mode: Mode = "chunk",
               add_bos: bool | None = None, *, source: str = "texts") -> CalibrationSet:
    """Calibration windows from strings (a single string counts as one document)."""
    _check_sizes(num_samples, seq_len)
    if mode not in ("chunk", "random"):
        raise ValueError(f"mode must be 'chunk' or 'random', got {mode!r}")
    if isinstance(texts, str):
        texts = [texts]
    bos = _wants_bos(tokenizer, add_bos)
    body = seq_len - 1 if bos is not None else seq_len
    need = num_samples * body if mode == "chunk" else None
    stream, n_docs = _stream_from_texts(texts, tokenizer, need, source)
    return _build(stream, num_samples=num_samples, seq_len=seq_len, seed=seed, mode=mode,
                  bos=bos, source=source, n_docs=n_docs)


def jsonl_texts(path: Path, text_field: str = "text") -> Iterator[str]:
    """The ``text_field`` string of every non-blank line of a JSONL file (``ValueError`` naming
    the file and line otherwise)."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {lineno} is not valid JSON: {e}") from None
            if not isinstance(row, dict) or text_field not in row:
                keys = list(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(f"{path}: line {lineno} has no {text_field!r} field "
                                 f"(found {keys}); pass text_field=...")
            val = row[text_field]
            if not isinstance(val, str):  # bad file content, not a bad argument
                raise ValueError(  # noqa: TRY004
                    f"{path}: line {lineno}: field {text_field!r} is "
                    f"{type(val).__name__}, expected a string")
            yield val


def from_file(path: str | Path, tokenizer: Any, num_samples: int = 128, seq_len: int = 2048,
              seed: int = 0, mode: Mode = "chunk", add_bos: bool | None = None,
              text_field: str = "text") -> CalibrationSet:
    """Calibration windows from a ``.txt`` file (the whole file is one document) or a
    ``.jsonl`` file (one JSON object per line, text in ``text_field``)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"calibration file {str(p)!r} does not exist")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        texts: Iterable[str] = jsonl_texts(p, text_field)
    elif suffix in (".txt", ".text", ".md", ""):
        texts = [p.read_text(encoding="utf-8")]
    else:
        raise ValueError(f"calibration file {str(p)!r}: unsupported extension {suffix!r} "
                         "(use .txt or .jsonl)")
    return from_texts(texts, tokenizer, num_samples=num_samples, seq_len=seq_len, seed=seed,
                      mode=mode, add_bos=add_bos, source=str(p))


def from_dataset(ds: Any, tokenizer: Any | None = None, num_samples: int = 128,
                 seq_len: int = 2048, seed: int = 0, mode: Mode = "chunk",
                 add_bos: bool | None = None, text_field: str = "text") -> CalibrationSet:
    """Calibration windows from a ``datasets.Dataset`` (or any sequence of row dicts): its
    ``text_field`` column is tokenized, or, when it has an ``input_ids`` column and no text,
    the token rows are used as they are (documents joined as for text)."""
    columns = getattr(ds, "column_names", None)
    if columns is None:
        first = ds[0] if len(ds) else {}
        columns = list(first) if isinstance(first, dict) else []
    source = f"dataset({len(ds)} rows)"
    if text_field in columns:
        if tokenizer is None:
            raise ValueError(f"{source}: a tokenizer is needed for the {text_field!r} column")
        texts = (row[text_field] for row in _rows(ds))
        return from_texts(texts, tokenizer, num_samples=num_samples, seq_len=seq_len,
                          seed=seed, mode=mode, add_bos=add_bos, source=source)
    if "input_ids" in columns:
        _check_sizes(num_samples, seq_len)
        docs = [torch.as_tensor(row["input_ids"], dtype=torch.long).reshape(-1)
                for row in _rows(ds)]
        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        parts: list[torch.Tensor] = []
        for d in docs:
            if parts and eos is not None:
                parts.append(torch.tensor([int(eos)]))
            parts.append(d)
        stream = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
        return _build(stream, num_samples=num_samples, seq_len=seq_len, seed=seed, mode=mode,
                      bos=None, source=source, n_docs=len(docs))
    raise ValueError(f"{source}: no {text_field!r} or 'input_ids' column (columns: {columns}); "
                     "pass text_field=...")


def _rows(ds: Any) -> Iterator[dict[str, Any]]:
    for i in range(len(ds)):
        yield ds[i]


def from_tensors(input_ids: torch.Tensor | Sequence[torch.Tensor],
                 attention_mask: torch.Tensor | Sequence[torch.Tensor] | None = None,
                 ) -> CalibrationSet:
    """Pre-tokenized samples: a ``[n, L]`` (or ``[L]``) integer tensor or a list of 1-D/[1, L]
    tensors. With ``attention_mask``, padding (zeros at either end of a row) is stripped so
    only real tokens reach the Hessians; a mask with holes inside a row is an error."""
    if isinstance(input_ids, torch.Tensor):
        rows = [input_ids.reshape(1, -1)] if input_ids.dim() == 1 else list(input_ids)
        if input_ids.dim() > 2:
            raise ValueError(f"input_ids must be [n, L] or [L], got {list(input_ids.shape)}")
    else:
        rows = list(input_ids)
    if attention_mask is None:
        masks: list[torch.Tensor | None] = [None] * len(rows)
    elif isinstance(attention_mask, torch.Tensor):
        if attention_mask.dim() == 1:
            attention_mask = attention_mask.reshape(1, -1)
        masks = list(attention_mask)
    else:
        masks = list(attention_mask)
    if len(masks) != len(rows):
        raise ValueError(f"attention_mask has {len(masks)} rows, input_ids {len(rows)}")
    if not rows:
        raise ValueError("from_tensors: no samples")
    ids_out, mask_out = [], []
    for i, (r, m) in enumerate(zip(rows, masks)):
        r = torch.as_tensor(r)
        if r.is_floating_point() or r.is_complex() or r.dtype == torch.bool:
            raise TypeError(f"sample {i}: token ids must be integers, got {r.dtype}")
        r = r.reshape(-1).long()
        if m is not None:
            m = torch.as_tensor(m).reshape(-1)
            if m.shape != r.shape:
                raise ValueError(f"sample {i}: attention_mask shape {list(m.shape)} does not "
                                 f"match input_ids {list(r.shape)}")
            keep = (m != 0).nonzero().flatten()
            if keep.numel() == 0:
                continue
            lo, hi = int(keep[0]), int(keep[-1]) + 1
            if keep.numel() != hi - lo:
                raise ValueError(f"sample {i}: attention_mask has zeros inside the row; only "
                                 "left/right padding can be stripped")
            r = r[lo:hi]
        if r.numel() == 0:
            continue
        ids_out.append(r.reshape(1, -1).clone())
        mask_out.append(torch.ones_like(ids_out[-1]))
    if not ids_out:
        raise ValueError("from_tensors: every sample is empty after removing padding")
    seq_len = max(x.shape[1] for x in ids_out)
    return CalibrationSet(ids_out, mask_out, seq_len=seq_len, requested_samples=len(rows),
                          source="tensors")
