"""XTF: explainable token-level noise filtering (reasoning importance, knowledge novelty, relevance).

Paper: Yang et al., "Explainable Token-level Noise Filtering for LLM Fine-tuning Datasets" (ICLR
2026, arXiv 2602.14536). A response token is noise when it fails any one of three tests, and
noise tokens get label -100:
- RI (reasoning importance): attention the token *receives* from later tokens, averaged over
  heads and layers (or the last layer); noise below Q1 - 1.5 IQR of the example, capped at p_RI.
- KN (knowledge novelty): teacher-forced probability of the token; noise above 0.95 (already
  known), capped at p_KN (the most probable kept).
- TR (task relevance): cosine of the token's context-free embedding (the token fed alone,
  last-layer hidden state after the final norm) with a domain vector (mean over a word list);
  Multi-Otsu over all token occurrences of the pool; noise in the second-lowest cluster (paper),
  capped at p_TR per example.

Two presets (`XtfConfig.preset`). `paper` is the above exactly as first built here. Differences
from the published code (EonHao/XTF), on purpose: RI is a column statistic (what a token
receives), not the row mean of a softmax that is 1/t for every token; the TR cluster is the one
the paper names, not a threshold walked from cumulative proportions. Where the paper is silent:
RI averages over the later queries (a sum would favour early tokens, which have more of them);
domain words are embedded token by token with the same context-free embeddings as the scored
tokens; special tokens (e.g. the end-of-turn marker that teaches stopping) are never masked;
caps are floor(p * eligible tokens) per example.

`robust` (default) is this project's, because on SmolLM2 the paper's rules do not find inserted
noise (B3: union precision 0.013, recall 0.038; the masked fine-tune ended worse than the
unmasked one):
- RI relative to a uniform reader: under causal attention, attention received is confounded
  with position (early tokens have more queries, the first token is an attention sink). Each
  later query's attention is renormalised over the keys it could see without the sink and the
  diagonal, times their number (1 = uniform), averaged over the later queries, over the middle
  half of the layers (the first layers attend locally, the last ones to the output).
- The Tukey fence never fires on a right-skewed score bounded by 0 (`Q1 - 1.5 IQR` is below
  every score). RI and TR are cut per pool instead, by `rule=mixture` (default): where the pool's
  scores hold a low population of their own (a two-Gaussian fit whose smaller, lower component is
  separated from the rest, Ashman's D > 2, and explains the pool better by BIC), the cut is where
  a token becomes more likely to belong to it; where there is none, the outlier cut below. Noise
  that makes up a few percent of the tokens is such a population, not a set of outliers: in B3
  the outlier cut alone masked 301 tokens (recall 0.098), the mixture 1,231 (recall 0.409, precision
  0.963; bench/results/token_noise.json), and on the clean copy both mask the same 0.1%.
  `mad` (the outlier cut alone: median - 3 x 1.4826 MAD, firing only where the pool has
  outliers), `share` (the pool's lowest share) and `example` (each example's lowest share, the
  literal within-example percentile) are options.
- TR: context-free last-layer embeddings of single tokens are nearly collinear (the paper's
  Multi-Otsu thresholds fall in cos 0.95-0.99) and digits, which this tokenizer splits one per
  character, land at the bottom. With a target (in-domain) set, TR is contextual: the token's
  state at the middle block against the in-domain set's own response-token states (mean cosine
  to the `tr_top_k` nearest, centred on their mean: a nearest-neighbour typicality that needs no
  word list). Without one, the word list's domain vector, centred on the mean context-free
  embedding of a seeded vocabulary sample (pool-independent, so shards agree). Digits, numbers
  and operators are never TR noise for math (`tr_protect_numeric`).
- Scores are averaged over each sentence or line (`smooth_spans`): noise comes in spans.
- KN is left out of the robust union: masking tokens the model already knows removes the easy
  tokens, not inserted noise (it stays available, with the paper's rule).
The per-token scores are features of the shared feature pass (capture.token_features: RI
`ReceivedAttention`, KN `TokenNll` with p = exp(-nll), contextual TR `ContextualRelevance`; the
in-domain states a `TokenStates` of the target's own pass, taken in target order), so they can be
cached (`score(..., cache=)`) and computed in one pass with other methods (tokens.shared.
score_and_mask). Alone, XTF reads them in one hooked pass per batch (eager attention when RI is
asked) plus, for context-free TR, one pass over the distinct token ids (cached in memory); numeric
protection and span smoothing are applied to the features afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any, Literal

import numpy as np
import torch

from mechsieve.config import ConfigError, check_choice
from mechsieve.data.render import Rendered
from mechsieve.tokens.attributes import (
    above_threshold,
    cosine_to,
    in_clusters,
    iqr_low_outliers,
)
from mechsieve.tokens.base import REASON_BITS, TokenMasks, TokenScores, register_masker
from mechsieve.tokens.otsu import multi_otsu
from mechsieve.tokens.robust import (
    below_cut,
    centred_cosine,
    example_percentile,
    low_cut,
    mixture_cut,
    numeric_tokens,
    pool_values,
    smooth_over_spans,
    span_ids,
)
from mechsieve.tokens.shared import ForwardMasker, ModelFeatures, pass_summary, rendered_key

DOMAINS = ("math", "code", "medicine")
ATTRIBUTES = ("ri", "kn", "tr")
TR_CLUSTERS = {"second_lowest": [1], "lowest": [0], "two_lowest": [0, 1]}


PRESETS: dict[str, dict[str, Any]] = {
    # today's behaviour exactly: the paper's rules (see the module docstring)
    "paper": {"attributes": ["ri", "kn", "tr"], "ri_layers": "all", "ri_baseline": "raw", "rule": "paper",
              "smooth_spans": False, "p_ri": 0.05, "p_tr": 0.10, "tr_embedding": "context_free",
              "tr_centre": False, "tr_protect_numeric": False},
    "robust": {"attributes": ["ri", "tr"], "ri_layers": "middle", "ri_baseline": "uniform", "rule": "mixture",
               "smooth_spans": True, "p_ri": 0.5, "p_tr": 0.5, "tr_embedding": "auto", "tr_centre": True,
               "tr_protect_numeric": True},
}
"""The settings each preset gives the fields left unset (None)."""


@dataclass
class XtfConfig:
    """Settings of XTF token masking. Fields left unset (None) take the preset's value."""

    preset: Literal["robust", "paper"] = "robust"
    """`robust` (default): this project's rules that find inserted noise (module docstring);
    `paper`: the paper's rules exactly as first built here (RI Tukey fence, KN p > 0.95, TR
    Multi-Otsu on context-free embeddings). Any field set explicitly overrides the preset."""
    attributes: list[str] | None = None
    """Which tests to run: any of ri, kn, tr (the mask is their union). robust: ri, tr; paper: all."""
    ri_layers: Literal["all", "last", "middle"] | None = None
    """RI from attention averaged over all layers (paper), the last, or the middle half (blocks
    L/4 .. 3L/4, robust)."""
    ri_baseline: Literal["uniform", "raw"] | None = None
    """`uniform` (robust): each later query's attention relative to a uniform reader of the keys it
    could see, without the first (sink) token and the diagonal; `raw` (paper): attention as it is."""
    ri_iqr_k: float = 1.5
    """rule=paper: RI noise below Q1 - k * IQR of the example's response tokens."""
    p_ri: float | None = None
    """Most RI-masked tokens, as a fraction of an example's response tokens (paper 0.05, robust 0.5:
    noise comes in spans)."""
    kn_threshold: float = 0.95
    """KN noise when the teacher-forced probability is above this."""
    p_kn: float = 0.10
    """Most KN-masked tokens, as a fraction of an example's response tokens."""
    domain: str = "math"
    """Built-in domain word list for TR: math, code, medicine (ignored when words_file is set)."""
    words_file: str | None = None
    """A user word list for TR: one word a line, # comments."""
    tr_embedding: Literal["auto", "contextual", "context_free"] | None = None
    """`context_free` (paper): the token fed alone, last layer, against the word list's domain vector;
    `contextual`: the token's state in context at `tr_layer` against the in-domain (target) set's
    token states (needs a target); `auto` (robust): contextual when a target is given, else context_free."""
    tr_layer: int | None = None
    """Block of the contextual states (default: the middle block)."""
    tr_top_k: int = 8
    """Contextual TR: mean cosine to the k most similar in-domain token states."""
    tr_centre: bool | None = None
    """Centre before the cosine (robust): contextual, on the in-domain states' mean; context-free, on
    the mean embedding of a seeded sample of the vocabulary (raw states are nearly collinear)."""
    tr_protect_numeric: bool | None = None
    """Digits, numbers and operators are never TR noise (robust): this tokenizer splits numbers one
    digit a token, and they are the task in math."""
    tr_classes: int = 5
    """rule=paper: number of Multi-Otsu classes over the TR similarities (the published code uses 5)."""
    tr_cluster: Literal["second_lowest", "lowest", "two_lowest"] = "second_lowest"
    """rule=paper: which low-relevance cluster is noise: second_lowest (paper), lowest, or both."""
    p_tr: float | None = None
    """Most TR-masked tokens, as a fraction of an example's response tokens (paper 0.10, robust 0.5)."""
    rule: Literal["paper", "mad", "mixture", "share", "example"] | None = None
    """How RI and TR scores become masks: `paper` (Tukey fence for RI, Multi-Otsu for TR);
    `mixture` (robust): below the point where the pool's separate low population takes over (a
    two-Gaussian fit, tokens.robust.mixture_cut), else as `mad`; `mad`: below the pool's median -
    rule_z x 1.4826 MAD, an outlier cut that fires only where the pool has outliers; `share`: the
    pool's lowest rule_share; `example`: each example's lowest rule_share (masks every example,
    clean ones too)."""
    rule_z: float = 3.0
    """rule=mad: how many robust standard deviations below the median."""
    rule_share: float = 0.05
    """rule=share / example: the share of tokens flagged."""
    smooth_spans: bool | None = None
    """Average RI and TR over each sentence or line of the response before deciding (robust)."""
    max_tokens: int = 4096
    """Token budget of one forward batch (eager attention holds [b, heads, t, t] per layer)."""
    max_batch: int = 64
    """Most examples in one forward batch."""

    def __post_init__(self) -> None:
        check_choice("xtf.preset", self.preset, tuple(PRESETS))
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:
                setattr(self, key, list(value) if isinstance(value, list) else value)
        bad = [a for a in self.attributes if a not in ATTRIBUTES]
        if bad or not self.attributes:
            raise ConfigError(f"xtf.attributes={self.attributes}: choose one or more of {list(ATTRIBUTES)}")
        check_choice("xtf.ri_layers", self.ri_layers, ("all", "last", "middle"))
        check_choice("xtf.ri_baseline", self.ri_baseline, ("uniform", "raw"))
        check_choice("xtf.tr_embedding", self.tr_embedding, ("auto", "contextual", "context_free"))
        check_choice("xtf.rule", self.rule, ("paper", "mad", "mixture", "share", "example"))
        check_choice("xtf.tr_cluster", self.tr_cluster, tuple(TR_CLUSTERS))
        if self.words_file is None:
            check_choice("xtf.domain", self.domain, DOMAINS)
        for name in ("p_ri", "p_kn", "p_tr", "kn_threshold", "rule_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"xtf.{name}={value} must lie in [0, 1]")
        if self.rule_z <= 0 or self.tr_top_k < 1:
            raise ConfigError("xtf.rule_z must be > 0 and xtf.tr_top_k >= 1")
        if self.tr_classes < 2 or (self.tr_cluster != "lowest" and self.tr_classes < 3):
            raise ConfigError(f"xtf.tr_classes={self.tr_classes}: need >= 2 (>= 3 unless tr_cluster=lowest)")
        if self.max_tokens < 1 or self.max_batch < 1:
            raise ConfigError("xtf.max_tokens and xtf.max_batch must be positive")


def parse_word_list(text: str) -> list[str]:
    """Words of a word-list file: one a line, blank lines and # comments skipped."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def bundled_words(domain: str) -> list[str]:
    """The built-in word list of `domain` (math, code, medicine)."""
    check_choice("xtf.domain", domain, DOMAINS)
    path = resources.files("mechsieve.tokens") / "wordlists" / f"{domain}.txt"
    return parse_word_list(path.read_text(encoding="utf-8"))


def context_free_embeddings(model: Any, token_ids: Sequence[int], batch: int = 512) -> torch.Tensor:
    """Last-layer hidden state (after the final norm) of each token fed alone: [n, d] float32."""
    from mechsieve.models.hooks import unwrap

    base = unwrap(model).base_model
    device = next(base.parameters()).device
    ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=device)
    out = []
    with torch.no_grad():
        for start in range(0, len(ids), batch):
            chunk = ids[start:start + batch, None]
            hidden = base(input_ids=chunk, attention_mask=torch.ones_like(chunk), use_cache=False).last_hidden_state
            out.append(hidden[:, 0].float().cpu())
    d = unwrap(model).config.hidden_size
    return torch.cat(out) if out else torch.zeros(0, d)


def word_token_ids(tokenizer: Any, word: str) -> list[int]:
    """Token ids of `word` as it appears mid-text (with a leading space), whitespace-only pieces
    dropped."""
    for text in (" " + word, word):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = [i for i in ids if tokenizer.decode([i]).strip()]
        if ids:
            return ids
    return []


def middle_layers(n_layers: int) -> list[int]:
    """The middle half of the blocks: L/4 .. 3L/4 (at least one)."""
    lo, hi = n_layers // 4, max(n_layers // 4 + 1, (3 * n_layers) // 4)
    return list(range(lo, hi))


@register_masker("xtf")
class Xtf(ForwardMasker):
    """XTF token masking (see the module docstring for the paper, the presets and the differences).

    `target`: in-domain examples (Example records) whose response tokens define the domain of
    contextual TR, rendered with `render_cfg`."""

    def __init__(self, cfg: XtfConfig | None = None, words: list[str] | None = None,
                 target: Sequence[Any] | None = None, render_cfg: Any = None) -> None:
        self.cfg = cfg or XtfConfig()
        self.words = words if words is not None else bundled_words(self.cfg.domain)
        self.target = list(target or [])
        self.render_cfg = render_cfg
        wants_tr = "tr" in self.cfg.attributes
        if wants_tr and self.cfg.tr_embedding == "contextual" and not self.target:
            raise ConfigError("xtf.tr_embedding=contextual reads the domain from an in-domain set: pass "
                              "--target FILE, or set xtf.tr_embedding=context_free to use the word list")
        self.contextual = wants_tr and self.cfg.tr_embedding != "context_free" and bool(self.target)
        if wants_tr and not self.contextual and not self.words:
            raise ConfigError("xtf: the TR word list is empty; give xtf.words_file with words or a domain")
        self._embed_cache: dict[int, torch.Tensor] = {}
        self._cache_owner: int | None = None
        self._target_states: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self._pieces: dict[int, str] = {}

    # -- scoring (model): features of the pool's pass, then post-processing ------------------
    def feature_passes(self, loaded: Any, key: Any = None, *, cache: Any = None,
                       progress: bool = True) -> list[ModelFeatures]:
        """RI (`ri`, capture.token_features.ReceivedAttention), KN (`kn`, TokenNll: p = exp(-nll))
        and contextual TR (`tr`, ContextualRelevance) as cfg asks. Alone (`key` None) they share
        one eager pass as XTF always had; in a shared pass (`key` given) RI alone goes to an eager
        pass of its own (site=attention) and KN / TR ride with the other methods' features."""
        from mechsieve.capture.token_features import (
            ContextualRelevance,
            ReceivedAttention,
            TokenNll,
        )
        from mechsieve.models.hooks import hook_points

        cfg = self.cfg
        alone = key is None
        if alone:  # the examples come rendered
            key = rendered_key(cfg.max_tokens, cfg.max_batch)
        eager = replace(key, site="attention")
        with_ri = "ri" in cfg.attributes
        own = eager if alone and with_ri else key
        n_layers = hook_points(loaded.model).n_layers
        feats: dict[str, Any] = {}
        if with_ri:
            ri_layers = {"all": list(range(n_layers)), "last": [n_layers - 1], "middle": middle_layers(n_layers)}
            feats["ri"] = ReceivedAttention(eager, ri_layers[cfg.ri_layers], cfg.ri_baseline)
        if "kn" in cfg.attributes:
            feats["kn"] = TokenNll(own)
        if self.contextual:
            centre, unit = self._target_token_states(loaded, cache=cache, progress=progress)
            feats["tr"] = ContextualRelevance(own, self._tr_layer(loaded.model), centre, unit, cfg.tr_top_k)
        return [ModelFeatures(loaded, feats)]

    def from_features(self, loaded: Any, rendered: Sequence[Rendered], arrays: dict[str, dict[str, np.ndarray]],
                      reports: list[Any]) -> TokenScores:
        """TokenScores from the pass's features, then context-free TR, numeric protection and span
        smoothing (the model runs only for context-free embeddings)."""
        from mechsieve.capture.token_features import split

        cfg, tokenizer = self.cfg, loaded.tokenizer
        eligible = eligible_tokens(rendered, getattr(tokenizer, "all_special_ids", []) or [])
        scores: dict[str, list[np.ndarray]] = {}
        info: dict[str, Any] = {"preset": cfg.preset}
        if "ri" in arrays:
            scores["ri"] = split(arrays["ri"])
        if "kn" in arrays:  # torch's exp of the log-probability: token_probabilities' value, bit for bit
            scores["kn"] = [torch.from_numpy(-nll).exp().numpy() for nll in split(arrays["kn"])]
        if "tr" in arrays:
            scores["tr"] = [np.where(e, rel, np.nan).astype(np.float32) for e, rel in zip(eligible, split(arrays["tr"]))]
            info["tr"] = {"embedding": "contextual", "layer": self._tr_layer(loaded.model),
                          "target_tokens": int(self._target_states[2].shape[0])}
        if arrays:
            info["forward"] = pass_summary(reports)
        if "tr" in cfg.attributes and not self.contextual:
            scores["tr"], info["tr"] = self._relevance(loaded.model, tokenizer, rendered, eligible)
        if cfg.tr_protect_numeric and "tr" in scores:
            for k, r in enumerate(rendered):
                scores["tr"][k][numeric_tokens(self._token_pieces(tokenizer, r.input_ids))] = np.nan
        if cfg.smooth_spans:
            for name in ("ri", "tr"):
                for k, r in enumerate(rendered):
                    if name in scores:
                        spans = span_ids(self._token_pieces(tokenizer, r.input_ids))
                        scores[name][k] = smooth_over_spans(scores[name][k], eligible[k], spans)
        return TokenScores(scores, eligible, info)

    def _token_pieces(self, tokenizer: Any, ids: np.ndarray) -> list[str]:
        """The text of each token (cached per id)."""
        for t in {int(x) for x in ids} - self._pieces.keys():
            self._pieces[t] = tokenizer.decode([t])
        return [self._pieces[int(x)] for x in ids]

    def _tr_layer(self, model: Any) -> int:
        from mechsieve.models.hooks import hook_points

        hp = hook_points(model)
        return hp.normalize_layers([self.cfg.tr_layer if self.cfg.tr_layer is not None else hp.n_layers // 2])[0]

    def _target_token_states(self, loaded: Any, cache: Any = None, progress: bool = False
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(centre [d], unit centred in-domain token states [m, d]) at tr_layer, on the model's
        device; from a TokenStates feature of the target's own pass (cached per model, and in
        `cache`). The states are taken in target order."""
        from mechsieve.capture.shared import PassKey, feature_pass, render_inputs
        from mechsieve.capture.token_features import TokenStates
        from mechsieve.data.render import RenderConfig

        model = loaded.model
        if self._target_states is not None and self._target_states[0] == id(model):
            return self._target_states[1], self._target_states[2]  # (centre, unit)
        key = PassKey(self.render_cfg or RenderConfig(), self.cfg.max_tokens, self.cfg.max_batch)
        got, _ = feature_pass(loaded, self.target, {"states": TokenStates(key, self._tr_layer(model))}, cache=cache,
                              progress=False, desc="xtf: target")
        rendered = render_inputs(self.target, loaded.tokenizer, key)
        elig = eligible_tokens(rendered, getattr(loaded.tokenizer, "all_special_ids", []) or [])
        values = got["states"]["values"]
        keep = np.concatenate(elig) if elig else np.zeros(0, dtype=bool)
        if values.ndim != 2 or not keep.any():
            raise ConfigError("xtf: the in-domain (target) set has no response token to define the domain")
        states = torch.from_numpy(values[keep]).to(next(model.parameters()).device)
        centre = states.mean(0) if self.cfg.tr_centre else torch.zeros(states.shape[1], device=states.device)
        unit = torch.nn.functional.normalize(states - centre, dim=-1)
        self._target_states = (id(model), centre, unit)
        return centre, unit

    def _relevance(self, model: Any, tokenizer: Any, rendered: Sequence[Rendered], eligible: list[np.ndarray]):
        if self._cache_owner != id(model):
            self._embed_cache, self._cache_owner = {}, id(model)
        word_ids = {w: word_token_ids(tokenizer, w) for w in self.words}
        used = [w for w, ids in word_ids.items() if ids]
        if not used:
            raise ConfigError("xtf: none of the TR words tokenizes to a non-space token; check the word list")
        needed = {int(t) for r, e in zip(rendered, eligible) for t in r.input_ids[e]}
        needed |= {t for w in used for t in word_ids[w]}
        sample = vocabulary_sample(model, tokenizer) if self.cfg.tr_centre else []
        needed |= set(sample)
        missing = sorted(needed - self._embed_cache.keys())
        if missing:
            emb = context_free_embeddings(model, missing)
            self._embed_cache.update({t: emb[k] for k, t in enumerate(missing)})
        domain = torch.stack([torch.stack([self._embed_cache[t] for t in word_ids[w]]).mean(0) for w in used]).mean(0)
        ids = sorted(needed)
        info = {"embedding": "context_free", "words_used": len(used), "words_skipped": len(self.words) - len(used),
                "distinct_tokens": len(ids), "embedded_now": len(missing)}
        if ids and self.cfg.tr_centre:
            centre = torch.stack([self._embed_cache[t] for t in sample]).mean(0)
            sims = centred_cosine(torch.stack([self._embed_cache[t] for t in ids]), domain, centre).numpy()
            info["centre_tokens"] = len(sample)
        else:
            sims = cosine_to(torch.stack([self._embed_cache[t] for t in ids]), domain).numpy() if ids else np.zeros(0)
        lookup = dict(zip(ids, sims.tolist()))
        tr = []
        for r, e in zip(rendered, eligible):
            out = np.full(len(r), np.nan, dtype=np.float32)
            out[e] = [lookup[int(t)] for t in r.input_ids[e]]
            tr.append(out)
        return tr, info

    # -- deciding (pure) ---------------------------------------------------------------------
    def decide(self, scores: TokenScores) -> TokenMasks:
        cfg = self.cfg
        info: dict[str, Any] = {"preset": cfg.preset, "rule": cfg.rule}
        thresholds = None
        cuts: dict[str, float] = {}
        if cfg.rule == "paper" and "tr" in scores.scores:
            tr_all = pool_values(scores.scores["tr"], scores.eligible)
            if tr_all.size:
                thresholds = multi_otsu(tr_all, cfg.tr_classes)
                info["tr_thresholds"] = [float(t) for t in thresholds]
                cluster = np.digitize(tr_all, thresholds)
                info["tr_cluster_shares"] = [float(np.mean(cluster == k)) for k in range(cfg.tr_classes)]
        elif cfg.rule in ("mad", "mixture", "share"):
            for name in ("ri", "tr"):
                if name in scores.scores:
                    values = pool_values(scores.scores[name], scores.eligible)
                    cuts[name] = low_cut(values, cfg.rule, cfg.rule_z, cfg.rule_share)
                    if cfg.rule == "mixture":
                        info.setdefault("mixture", {})[name] = mixture_cut(values)[1]
            info["cuts"] = {k: (None if np.isnan(v) else float(v)) for k, v in cuts.items()}
        caps = {"ri": cfg.p_ri, "tr": cfg.p_tr}
        masks, reasons = [], []
        for i, elig in enumerate(scores.eligible):
            reason = np.zeros(elig.shape, dtype=np.uint8)
            for name in ("ri", "tr"):
                if name not in scores.scores:
                    continue
                values = scores.scores[name][i]
                if cfg.rule == "paper":
                    if name == "ri":
                        flag = iqr_low_outliers(values, elig, cfg.ri_iqr_k, cfg.p_ri)
                    elif thresholds is not None:
                        flag = in_clusters(values, elig, thresholds, TR_CLUSTERS[cfg.tr_cluster], cfg.p_tr)
                    else:
                        continue
                elif cfg.rule == "example":
                    flag = example_percentile(values, elig, cfg.rule_share, caps[name])
                else:
                    flag = below_cut(values, elig, cuts[name], caps[name], inclusive=cfg.rule == "share")
                reason |= flag.astype(np.uint8) * REASON_BITS[name]
            if "kn" in scores.scores:
                flag = above_threshold(scores.scores["kn"][i], elig, cfg.kn_threshold, cfg.p_kn)
                reason |= flag.astype(np.uint8) * REASON_BITS["kn"]
            masks.append(reason > 0)
            reasons.append(reason)
        return TokenMasks(masks, reasons, info)


def vocabulary_sample(model: Any, tokenizer: Any, n: int = 2048, seed: int = 0) -> list[int]:
    """A seeded sample of `n` non-special vocabulary ids: the centre of centred context-free TR does
    not depend on the pool (so shards and the whole pool agree)."""
    from mechsieve.models.hooks import unwrap

    vocab = int(unwrap(model).config.vocab_size)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = np.random.default_rng(seed).permutation(vocab)
    return [int(t) for t in ids if int(t) not in special and int(t) < len(tokenizer)][:n]


def eligible_tokens(rendered: Sequence[Rendered], special_ids: Sequence[int]) -> list[np.ndarray]:
    """Response tokens that may be masked: bool [t] per example (special tokens excluded)."""
    special = np.asarray(sorted(set(special_ids)), dtype=np.int64)
    return [r.response_mask & ~np.isin(r.input_ids, special) for r in rendered]
