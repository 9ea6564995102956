"""Text for language models: byte tokens of a corpus of documents, split by document, in blocks.

The tokenizer is the identity on UTF-8 bytes (vocabulary 256): nothing to train, nothing to
download, every text encodes, and a perplexity per token is a perplexity per byte, comparable
across models of any size. The corpus is a folder of files in fortune's format (documents
separated by a line holding ``%``, as ``strfile`` reads them): the demo's corpus is Debian's
``fortunes`` package (``/usr/share/games/fortunes``), whose ``.dat`` index files and ``.u8``
links are skipped.

Each document goes to the train, validation or test split by a hash of its bytes
(:func:`split_of`): the split does not depend on file order or on the other documents, and a
document repeated in the corpus lands in one split only (no test text seen in training). A
split is its documents, each followed by the separator ``%\\n`` (the model learns where a
document ends), concatenated in corpus order and cut into blocks of ``seq_len + 1`` tokens that
overlap by one: a block's first ``seq_len`` tokens are the input, its last ``seq_len`` the
targets, so every token but the split's first is predicted once.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..seeding import derive_seed

VOCAB_SIZE = 256
SEPARATOR = b"%\n"
SPLITS = ("train", "val", "test")
HELD_OUT_PERCENT = {"val": 5, "test": 5}
"""Each held-out split's share of the documents, in percent of the hash's 100 buckets."""
SKIPPED_SUFFIXES = (".dat", ".u8")  # strfile's index files and fortune's UTF-8 links to the same text


def encode(text: str | bytes) -> torch.Tensor:
    """Token ids of ``text``: its UTF-8 bytes, as a ``torch.long`` vector."""
    data = text.encode() if isinstance(text, str) else bytes(text)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def decode(ids: torch.Tensor) -> str:
    """The text of byte token ids (invalid UTF-8, e.g. a cut character, shown as U+FFFD)."""
    return bytes(ids.to(torch.uint8).tolist()).decode(errors="replace")


def read_documents(root: str | os.PathLike) -> list[bytes]:
    """The documents of every corpus file under ``root`` (a folder, or one file), in sorted file
    order; empty documents are dropped. Raises OSError (one line) when there is none."""
    root = Path(root)
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix not in SKIPPED_SUFFIXES)
    else:
        raise FileNotFoundError(
            f"text corpus {root} not found: give data.root a folder of fortune-format files"
        )
    docs = []
    for f in files:
        for doc in f.read_bytes().replace(b"\r\n", b"\n").split(b"\n%\n"):
            doc = doc.strip(b"\n")
            if doc and doc != b"%":
                docs.append(doc + b"\n")
    if not docs:
        raise FileNotFoundError(
            f"text corpus {root} holds no documents (files of text separated by lines of '%')"
        )
    return docs


def split_of(doc: bytes) -> str:
    """``train``, ``val`` or ``test``: the split document ``doc`` belongs to (a hash of its bytes)."""
    bucket = int.from_bytes(hashlib.sha256(doc).digest()[:8], "little") % 100
    if bucket < HELD_OUT_PERCENT["test"]:
        return "test"
    if bucket < HELD_OUT_PERCENT["test"] + HELD_OUT_PERCENT["val"]:
        return "val"
    return "train"


@dataclass
class TextBlocks:
    """One split as ``[blocks, seq_len + 1]`` token ids (see the module docstring)."""

    blocks: torch.Tensor
    split: str
    documents: int

    @property
    def seq_len(self) -> int:
        return self.blocks.shape[1] - 1

    def __len__(self) -> int:
        return self.blocks.shape[0]

    @property
    def tokens(self) -> int:
        """Tokens predicted over the split's blocks."""
        return len(self) * self.seq_len


def load_text_split(root: str | os.PathLike, split: str, seq_len: int) -> TextBlocks:
    """The blocks of ``split`` of the corpus under ``root``. Raises ValueError when the split
    holds fewer tokens than one block."""
    if split not in SPLITS:
        raise ValueError(f"text split {split!r} is not one of {', '.join(SPLITS)}")
    docs = [d for d in read_documents(root) if split_of(d) == split]
    stream = encode(b"".join(d + SEPARATOR for d in docs))
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise ValueError(
            f"the {split} split of {root} holds {len(stream)} tokens, fewer than one block of "
            f"data.seq_len={seq_len} + 1: use a larger corpus or a shorter data.seq_len"
        )
    starts = torch.arange(n) * seq_len
    blocks = stream[starts[:, None] + torch.arange(seq_len + 1)]
    return TextBlocks(blocks, split, len(docs))


class BlockBatches:
    """Training batches of ``(input ids, target ids)``, each ``[batch_size, seq_len]``.

    ``train_size`` > 0 keeps that many blocks, the first of a permutation seeded by ``seed``
    alone (so a run with fewer blocks trains on a prefix of a longer run's blocks: less data,
    never other data). Each epoch reshuffles them by ``(seed, epoch)``; the last partial batch is
    dropped. ``epoch_batches(epoch, start)`` is what the engine iterates: the same batches for the
    same arguments, so a resume continues exactly.
    """

    def __init__(self, data: TextBlocks, batch_size: int, seed: int, train_size: int = 0):
        keep = torch.randperm(len(data), generator=_generator("text-subset", seed))
        if train_size:
            if train_size > len(data):
                raise ValueError(
                    f"data.train_size={train_size} asks for more blocks than the training split holds ({len(data)})"
                )
            keep = keep[:train_size]
        self.blocks, self.batch_size, self.seed = data.blocks[keep.sort().values], batch_size, seed

    def __len__(self) -> int:
        return len(self.blocks) // self.batch_size

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * (self.blocks.shape[1] - 1)

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.blocks), generator=_generator("text-epoch", self.seed, epoch))
        for b in range(start, len(self)):
            block = self.blocks[order[b * self.batch_size : (b + 1) * self.batch_size]]
            yield block[:, :-1], block[:, 1:]


def eval_batches(data: TextBlocks, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every block of ``data`` once, in order: ``(input ids, target ids)`` batches."""
    for i in range(0, len(data), batch_size):
        block = data.blocks[i : i + batch_size]
        yield block[:, :-1], block[:, 1:]


def _generator(*parts: int | str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(derive_seed(*parts))
    return g
