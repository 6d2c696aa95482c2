"""Calibration data: windows are exact slices of the token stream, modes, files, warnings."""

from __future__ import annotations

import json

import pytest
import torch
from ferroquant import calibration as C
from shared_data import DATA

MODEL = DATA / "models" / "stories260K"
TINY = DATA / "text" / "tinystories_valid_30k.txt"
C4 = DATA / "text" / "c4_calibration.jsonl"

pytestmark = pytest.mark.skipif(not MODEL.is_dir(), reason="../shared/data is not available")


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def stories() -> list[str]:
    # one story per line in this file
    docs = [d.strip() for d in TINY.read_text(encoding="utf-8").splitlines()]
    return [d for d in docs if d]


def _stream(tok, docs: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for d in docs:
        if ids:
            ids.append(tok.eos_token_id)
        ids += tok(d, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids)


def test_chunk_windows_are_consecutive_stream_slices_with_bos(tok, stories) -> None:
    stream = _stream(tok, stories)
    cs = C.from_texts(stories, tok, num_samples=4, seq_len=64)
    assert len(cs) == 4 and cs.num_tokens == 4 * 64
    assert cs.meta["bos"] == tok.bos_token_id == 1  # the llama tokenizer adds BOS by itself
    for i, (ids, m) in enumerate(zip(cs.input_ids, cs.attention_mask)):
        assert ids.shape == (1, 64) and ids.dtype == torch.long
        assert torch.equal(m, torch.ones_like(ids))
        assert ids[0, 0] == tok.bos_token_id
        assert torch.equal(ids[0, 1:], stream[i * 63:(i + 1) * 63])
    # without BOS the windows tile the stream exactly
    cs2 = C.from_texts(stories, tok, num_samples=3, seq_len=50, add_bos=False)
    assert torch.equal(torch.cat([x[0] for x in cs2.input_ids]), stream[:150])
    # documents are tokenized only as far as needed in chunk mode
    assert cs2.meta["documents"] < len(stories)


def test_random_windows_are_seeded_slices(tok, stories) -> None:
    stream = _stream(tok, stories)
    a = C.from_texts(stories, tok, num_samples=6, seq_len=40, seed=1, mode="random",
                     add_bos=False)
    b = C.from_texts(stories, tok, num_samples=6, seq_len=40, seed=1, mode="random",
                     add_bos=False)
    c = C.from_texts(stories, tok, num_samples=6, seq_len=40, seed=2, mode="random",
                     add_bos=False)
    assert all(torch.equal(x, y) for x, y in zip(a.input_ids, b.input_ids))
    assert not all(torch.equal(x, y) for x, y in zip(a.input_ids, c.input_ids))
    windows = stream.unfold(0, 40, 1)
    for w in a.input_ids:
        assert w.shape == (1, 40)
        assert (windows == w[0]).all(1).any(), "a random window is not a slice of the stream"
    starts = {int((windows == w[0]).all(1).nonzero()[0]) for w in a.input_ids}
    assert len(starts) > 1


def test_too_little_text_warns_with_token_count(tok) -> None:
    text = "Once upon a time there was a cat. The cat liked milk."
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    with pytest.warns(UserWarning, match=rf"gave {n + 1} tokens, fewer than the 256 asked"):
        cs = C.from_texts([text], tok, num_samples=2, seq_len=128)
    # the whole (short) stream becomes one shorter sample, BOS included
    assert len(cs) == 1 and cs.input_ids[0].shape == (1, n + 1)
    with pytest.warns(UserWarning, match="fewer than"):
        C.from_texts([text], tok, num_samples=4, seq_len=64, mode="random")


def test_bad_arguments(tok) -> None:
    with pytest.raises(ValueError, match="num_samples"):
        C.from_texts(["a"], tok, num_samples=0)
    with pytest.raises(ValueError, match="seq_len"):
        C.from_texts(["a"], tok, seq_len=1)
    with pytest.raises(ValueError, match="mode"):
        C.from_texts(["a"], tok, mode="shuffle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="produced no tokens"):
        C.from_texts(["   ", ""], tok)
    with pytest.raises(TypeError, match="item 1 is int"):
        C.from_texts(["a", 3], tok)  # type: ignore[list-item]


def test_from_file_txt_and_jsonl(tmp_path, tok, stories) -> None:
    txt = tmp_path / "cal.txt"
    txt.write_text(stories[0], encoding="utf-8")
    a = C.from_file(txt, tok, num_samples=2, seq_len=32)
    b = C.from_texts([stories[0]], tok, num_samples=2, seq_len=32)
    assert all(torch.equal(x, y) for x, y in zip(a.input_ids, b.input_ids))

    jl = tmp_path / "cal.jsonl"
    jl.write_text("\n".join(json.dumps({"text": s, "id": i}) for i, s in enumerate(stories[:5])),
                  encoding="utf-8")
    a = C.from_file(jl, tok, num_samples=3, seq_len=32)
    b = C.from_texts(stories[:5], tok, num_samples=3, seq_len=32)
    assert all(torch.equal(x, y) for x, y in zip(a.input_ids, b.input_ids))
    assert a.source == str(jl)


def test_from_file_errors(tmp_path, tok) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        C.from_file(tmp_path / "nope.jsonl", tok)
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: line 2 has no 'text' field"):
        C.from_file(jl, tok, num_samples=1, seq_len=4096)
    jl.write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(ValueError, match=r"line 2 is not valid JSON"):
        C.from_file(jl, tok, num_samples=1, seq_len=4096)
    other = tmp_path / "cal.parquet"
    other.write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported extension"):
        C.from_file(other, tok)


@pytest.mark.skipif(not C4.is_file(), reason="C4 sample not available")
def test_default_c4_file(tok) -> None:
    assert C.DEFAULT_CALIBRATION_FILE.resolve() == C4.resolve()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cs = C.from_file(C.DEFAULT_CALIBRATION_FILE, tok, num_samples=4, seq_len=128)
    assert len(cs) == 4 and cs.num_tokens == 512
    assert cs.meta["documents"] < 50  # stopped reading once enough tokens were there


def test_from_dataset(tok, stories) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": stories[:5], "n": list(range(5))})
    a = C.from_dataset(ds, tok, num_samples=3, seq_len=32)
    b = C.from_texts(stories[:5], tok, num_samples=3, seq_len=32)
    assert all(torch.equal(x, y) for x, y in zip(a.input_ids, b.input_ids))
    # pre-tokenized rows
    rows = [tok(s, add_special_tokens=False)["input_ids"] for s in stories[:3]]
    ds2 = datasets.Dataset.from_dict({"input_ids": rows})
    c = C.from_dataset(ds2, num_samples=2, seq_len=16)
    assert torch.equal(c.input_ids[0][0], torch.tensor(rows[0][:16]))
    with pytest.raises(ValueError, match="no 'text' or 'input_ids' column"):
        C.from_dataset(datasets.Dataset.from_dict({"body": ["x"]}), tok)
    # a plain list of row dicts works too (duck typing)
    d = C.from_dataset([{"text": s} for s in stories[:5]], tok, num_samples=3, seq_len=32)
    assert all(torch.equal(x, y) for x, y in zip(d.input_ids, b.input_ids))


def test_from_tensors_strips_padding() -> None:
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12], [13, 14, 15, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    cs = C.from_tensors(ids, mask)
    assert [x.tolist() for x in cs.input_ids] == [[[5, 6, 7]], [[8, 9, 10, 11, 12]],
                                                  [[13, 14, 15]]]
    assert cs.num_tokens == 11 and cs.seq_len == 5
    assert all(torch.equal(m, torch.ones_like(x)) for x, m in zip(cs.input_ids,
                                                                  cs.attention_mask))
    one = C.from_tensors(torch.arange(10))
    assert len(one) == 1 and one.input_ids[0].shape == (1, 10)
    lst = C.from_tensors([torch.arange(4), torch.arange(6).reshape(1, 6)])
    assert [x.shape[1] for x in lst.input_ids] == [4, 6]
    with pytest.raises(ValueError, match="zeros inside the row"):
        C.from_tensors(ids[:1], torch.tensor([[1, 0, 1, 1, 1]]))
    with pytest.raises(TypeError, match="must be integers"):
        C.from_tensors(torch.randn(2, 3))
    with pytest.raises(ValueError, match="does not match"):
        C.from_tensors(ids, mask[:, :3])
