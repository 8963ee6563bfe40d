"""NatureLM-audio in PyTorch: BEATs -> LayerNorm -> windowed Q-Former -> Linear -> LLM + LoRA.

Audio is 16 kHz mono float32; every call sees exactly ``cfg.clip_s`` seconds (shorter audio
is zero-padded; `generate_windows` / `score_windows` cut longer recordings into reported
windows). The audio embeddings replace each ``<AudioHere>`` in the Llama-3 chat prompt
(`teacher.prompt`), spliced in through ``inputs_embeds``. Order of the audio path follows the
official model: ``ln_audio`` normalises the BEATs tokens *before* the Q-Former, and
``audio_llama_proj`` maps the Q-Former output into the LLM width.

    >>> import torch
    >>> from teacher.config import teacher_config
    >>> from teacher.tokenizer import train_tokenizer
    >>> cfg = teacher_config("tiny")
    >>> tok = train_tokenizer(["What is the common name? Answer: Kea", "Tui"], 300)
    >>> model = NatureLM(cfg, tok).eval()
    >>> audio = torch.zeros(2, 16000)               # 1 s, zero-padded to 10 s inside
    >>> model.encode_audio(audio).shape              # 15 windows of 17 of the 248 tokens
    torch.Size([2, 15, 128])
    >>> loss = model(audio, ["What is it? Answer:"] * 2, ["Kea", "Tui"])
    >>> model.score_labels(audio, ["What is it? Answer:"] * 2, ["Kea", "Tui"]).shape
    torch.Size([2, 2])
    >>> len(model.generate(audio, ["What is it? Answer:"] * 2, max_new_tokens=3))
    2

`score_labels` normalisation: ``"sum"`` is the log-likelihood of the whole answer (its tokens
and, with ``with_end=True``, the end token that closes it), so a softmax over the label set is
the teacher's distribution over those answers; ``"mean"`` divides by the token count.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from teacher.beats import BEATs
from teacher.config import TeacherConfig
from teacher.prompt import chat_prompt, count_audios, split_prompt
from teacher.qformer import WindowedQFormer
from teacher.tokenizer import END_OF_TEXT, EOT

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

NORMALIZATIONS = ("sum", "mean")
IGNORE = -100
ID_MEMO_SIZE = 65536  # texts whose token ids a model remembers


@dataclass
class LLMInputs:
    """A padded batch for the LLM: embeddings, mask, labels (-100 outside the answers)."""

    inputs_embeds: torch.Tensor  # [B, L, H]
    attention_mask: torch.Tensor  # [B, L], 1 on real positions
    labels: torch.Tensor | None  # [B, L]
    prompt_lengths: list[int]


@dataclass
class PromptCache:
    """Prompts that ran once (`NatureLM.prompt_cache`): their KV cache and next-token logits.

    Rows are left-padded to one length; ``mask`` marks real positions and ``lengths`` counts
    them (the position of each row's next token).
    """

    cache: Any  # the LLM's KV cache (transformers Cache) over [B, L]
    mask: torch.Tensor  # [B, L] long, 1 on real prompt positions
    lengths: torch.Tensor  # [B] real prompt tokens per row
    logits: torch.Tensor  # [B, V] float32 next-token logits after each prompt


@dataclass(frozen=True)
class WindowAnswer:
    """One window of a long recording and the teacher's answer for it."""

    start_s: float
    end_s: float
    text: str


def _torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def build_llm(cfg: TeacherConfig, vocab_needed: int) -> nn.Module:
    """The causal LM (local directory or a Llama from config), LoRA-wrapped when ``lora.r``."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    llm_cfg = cfg.llm
    dtype = _torch_dtype(llm_cfg.dtype)
    if llm_cfg.path is not None:
        from pathlib import Path

        if not Path(llm_cfg.path).is_dir():
            raise FileNotFoundError(f"{llm_cfg.path}: LLM directory not found (a local "
                                    "transformers model folder is needed; nothing is downloaded)")
        llm = AutoModelForCausalLM.from_pretrained(llm_cfg.path, local_files_only=True,
                                                   dtype=dtype)
        if vocab_needed > llm.get_input_embeddings().weight.shape[0]:
            llm.resize_token_embeddings(vocab_needed)
    else:
        if vocab_needed > llm_cfg.vocab_size:
            raise ValueError(f"the tokenizer has {vocab_needed} tokens but llm.vocab_size is "
                             f"{llm_cfg.vocab_size}")
        llm = LlamaForCausalLM(LlamaConfig(
            vocab_size=llm_cfg.vocab_size, hidden_size=llm_cfg.hidden_size,
            num_hidden_layers=llm_cfg.num_layers, num_attention_heads=llm_cfg.num_heads,
            num_key_value_heads=llm_cfg.num_kv_heads, intermediate_size=llm_cfg.intermediate_size,
            max_position_embeddings=llm_cfg.max_position_embeddings, tie_word_embeddings=False,
            attn_implementation="eager",
        )).to(dtype)
    if cfg.lora.r > 0:
        from peft import LoraConfig, get_peft_model

        llm = get_peft_model(llm, LoraConfig(
            r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
            target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM"))
    return llm


def answer_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                         weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of ``logits`` [B, L, V] over the answer tokens of
    ``labels`` [B, L] (`IGNORE` elsewhere); ``weights`` [B] makes it a weighted mean in which
    every answer token counts its example's weight."""
    targets = labels[:, 1:]
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    counted = (targets != IGNORE).to(per_token.dtype).sum(dim=1)
    w = torch.ones_like(counted) if weights is None else weights.to(counted.device, counted.dtype)
    return (per_token.sum(dim=1) * w).sum() / (counted * w).sum().clamp_min(1e-12)


class NatureLM(nn.Module):
    """The teacher. Submodule names follow the official checkpoint (see `teacher.official`).

    Args:
        cfg: the whole teacher configuration.
        tokenizer: a fast tokenizer with ``<|begin_of_text|>`` as bos and ``cfg.end_token``
            as one token (`teacher.tokenizer.train_tokenizer`, or a local Llama-3's).
    """

    def __init__(self, cfg: TeacherConfig, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.bos_id = self._token_id(tokenizer.bos_token, "bos token")
        self.end_id = self._token_id(cfg.end_token, "end_token")
        stops = {self.end_id}
        for name in (EOT, END_OF_TEXT):
            if name in tokenizer.get_vocab():
                stops.add(tokenizer.convert_tokens_to_ids(name))
        self.stop_ids = sorted(stops)
        self._id_memo: dict[str, tuple[int, ...]] = {}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.end_id

        dim = cfg.encoder.encoder_embed_dim
        self.beats = BEATs(cfg.encoder)
        self.ln_audio = nn.LayerNorm(dim)
        self.audio_qformer = WindowedQFormer(cfg.qformer, dim)
        self.llama_model = build_llm(cfg, len(tokenizer))
        llm_width = self.llama_model.get_input_embeddings().weight.shape[1]
        self.audio_llama_proj = nn.Linear(cfg.qformer.hidden_size, llm_width)
        # A from-scratch LM (tiny preset) needs audio tokens on its text embeddings' scale: a
        # LayerNorm whose gain starts at their RMS. NatureLM-audio has none (cfg.audio_norm off).
        self.audio_norm: nn.LayerNorm | None = None
        if cfg.audio_norm:
            self.audio_norm = nn.LayerNorm(llm_width)
            text = self.llama_model.get_input_embeddings().weight.detach().float()
            if not text.is_meta:  # a model built on the meta device (to count it) has no values
                nn.init.constant_(self.audio_norm.weight, float(text.pow(2).mean().sqrt()))
        self.apply_freeze_policy()
        # transformers 5 names the KV cache argument `cache`; 4.x called it `past_key_values`.
        base = getattr(self.llama_model, "get_base_model", lambda: self.llama_model)()
        params = inspect.signature(base.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def _token_id(self, token: str | None, what: str) -> int:
        if token is None or token not in self.tokenizer.get_vocab():
            raise ValueError(f"the tokenizer has no {what} {token!r} as a single token")
        return int(self.tokenizer.convert_tokens_to_ids(token))

    # -- parameters --------------------------------------------------------------------------
    def apply_freeze_policy(self) -> None:
        """Set ``requires_grad`` from the config's ``train_*`` flags."""
        cfg = self.cfg
        for p in self.beats.parameters():
            p.requires_grad_(cfg.train_encoder)
        for module in (self.ln_audio, self.audio_qformer):
            for p in module.parameters():
                p.requires_grad_(cfg.train_qformer)
        projection = [self.audio_llama_proj] + ([self.audio_norm] if self.audio_norm else [])
        for module in projection:  # the audio norm is part of the projection
            for p in module.parameters():
                p.requires_grad_(cfg.train_projection)
        for name, p in self.llama_model.named_parameters():
            p.requires_grad_(cfg.train_lora if "lora_" in name else cfg.train_llm)
        if not cfg.train_encoder:
            self.beats.eval()

    def train(self, mode: bool = True) -> NatureLM:
        """Like `nn.Module.train`, but a frozen encoder stays in eval mode."""
        super().train(mode)
        if not self.cfg.train_encoder:
            self.beats.eval()
        return self

    def count_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        params = list(self.parameters())
        return (sum(p.numel() for p in params if p.requires_grad),
                sum(p.numel() for p in params))

    @property
    def device(self) -> torch.device:
        return self.audio_llama_proj.weight.device

    @property
    def embed_dtype(self) -> torch.dtype:
        return self.llama_model.get_input_embeddings().weight.dtype

    # -- audio --------------------------------------------------------------------------------
    def fit_clip(self, audio: torch.Tensor, truncate: bool = False) -> torch.Tensor:
        """``audio[B, T]`` (or ``[T]``) as ``[B, clip_samples]`` float32: zero-padded; longer
        audio is truncated when ``truncate`` (training crops), else raises."""
        if audio.dim() == 1:
            audio = audio.unsqueeze(0)
        if audio.dim() != 2:
            raise ValueError(f"audio must be [batch, samples], got shape {tuple(audio.shape)}")
        audio = audio.to(device=self.device, dtype=torch.float32)
        if not torch.isfinite(audio).all():
            raise ValueError("audio holds NaN or Inf samples")
        n = self.cfg.clip_samples
        if audio.shape[1] > n and not truncate:
            raise ValueError(
                f"audio is {audio.shape[1] / self.cfg.sample_rate:.2f} s, longer than clip_s="
                f"{self.cfg.clip_s}; use teacher.model.generate_windows / score_windows, which "
                "window it and report the windows, or crop it first")
        if audio.shape[1] >= n:
            return audio[:, :n]
        return torch.nn.functional.pad(audio, (0, n - audio.shape[1]))

    def encode_audio(self, audio: torch.Tensor, truncate: bool = False) -> torch.Tensor:
        """``audio[B, T]`` -> audio tokens ``[B, Q, H_llm]`` (Q = windows x queries)."""
        wave = self.fit_clip(audio, truncate=truncate)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.cfg.train_encoder):
            features, mask = self.beats(wave)
        tokens = self.audio_llama_proj(self.audio_qformer(self.ln_audio(features), mask))
        if self.audio_norm is not None:
            tokens = self.audio_norm(tokens)
        return tokens.to(self.embed_dtype)

    # -- prompts ------------------------------------------------------------------------------
    def _ids(self, text: str) -> list[int]:
        """Token ids of ``text`` (memoised: labelling tokenises the same labels and prompt
        parts for every record)."""
        ids = self._id_memo.get(text)
        if ids is None:
            if len(self._id_memo) >= ID_MEMO_SIZE:
                self._id_memo.clear()
            ids = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            self._id_memo[text] = ids
        return list(ids)

    def _embed_ids(self, ids: Sequence[int]) -> torch.Tensor:
        table = self.llama_model.get_input_embeddings()
        return table(torch.tensor(list(ids), dtype=torch.long, device=self.device))

    def _audio_slices(self, n_audio: int, instructions: Sequence[str]) -> list[slice]:
        counts = [count_audios(q) for q in instructions]
        if sum(counts) != n_audio:
            raise ValueError(f"{n_audio} audios for prompts holding {sum(counts)} <AudioHere> "
                             f"placeholders ({counts}); give one audio per placeholder, in order")
        starts = [sum(counts[:i]) for i in range(len(counts))]
        return [slice(s, s + c) for s, c in zip(starts, counts, strict=True)]

    def prompt_embeds(self, audio_tokens: torch.Tensor, instruction: str) -> torch.Tensor:
        """``[P, H]``: bos, the chat prompt with ``audio_tokens[k]`` at the k-th placeholder."""
        parts = split_prompt(chat_prompt(instruction))
        if len(parts) - 1 != audio_tokens.shape[0]:
            raise ValueError(f"prompt holds {len(parts) - 1} placeholders, got "
                             f"{audio_tokens.shape[0]} audios")
        pieces = [self._embed_ids([self.bos_id] + self._ids(parts[0]))]
        for k, part in enumerate(parts[1:]):
            pieces.append(audio_tokens[k])
            pieces.append(self._embed_ids(self._ids(part)))
        return torch.cat(pieces, dim=0)

    def answer_ids(self, answer: str) -> list[int]:
        """The supervised tokens of an answer: its tokens then ``cfg.end_token``."""
        return self._ids(answer) + [self.end_id]

    def build_inputs(self, audio: torch.Tensor | None, instructions: Sequence[str],
                     answers: Sequence[str] | None = None, left_pad: bool = False,
                     truncate: bool = False, audio_embeds: torch.Tensor | None = None
                     ) -> LLMInputs:
        """Encode the audio and splice it into the prompts (plus answers when given).

        ``audio_embeds`` (``[n_audio, Q, H]``, an `encode_audio` result) is spliced in
        instead of encoding ``audio`` (then None): one encoding serves many prompts.
        """
        instructions = list(instructions)
        if answers is not None and len(answers) != len(instructions):
            raise ValueError(f"{len(instructions)} instructions but {len(answers)} answers")
        if audio_embeds is not None:
            if audio is not None:
                raise ValueError("give audio or audio_embeds, not both")
            if audio_embeds.dim() != 3:
                raise ValueError(f"audio_embeds must be [audios, tokens, width] (encode_audio "
                                 f"output), got shape {tuple(audio_embeds.shape)}")
            tokens = audio_embeds.to(device=self.device, dtype=self.embed_dtype)
        elif audio is None:
            raise ValueError("no audio: give audio [batch, samples] or audio_embeds")
        else:
            tokens = self.encode_audio(audio, truncate=truncate)
        seqs, labels, prompt_lengths = [], [], []
        for i, sl in enumerate(self._audio_slices(tokens.shape[0], instructions)):
            seq = self.prompt_embeds(tokens[sl], instructions[i])
            prompt_lengths.append(seq.shape[0])
            lab = [IGNORE] * seq.shape[0]
            if answers is not None:
                ids = self.answer_ids(answers[i])
                seq = torch.cat([seq, self._embed_ids(ids)], dim=0)
                lab += ids
            seqs.append(seq)
            labels.append(lab)
        return self._pad(seqs, labels if answers is not None else None, prompt_lengths, left_pad)

    def _pad(self, seqs: list[torch.Tensor], labels: list[list[int]] | None,
             prompt_lengths: list[int], left_pad: bool) -> LLMInputs:
        length = max(s.shape[0] for s in seqs)
        width = seqs[0].shape[1]
        embeds = seqs[0].new_zeros(len(seqs), length, width)
        mask = torch.zeros(len(seqs), length, dtype=torch.long, device=self.device)
        lab = torch.full((len(seqs), length), IGNORE, dtype=torch.long, device=self.device)
        for i, s in enumerate(seqs):
            n = s.shape[0]
            where = slice(length - n, length) if left_pad else slice(0, n)
            embeds[i, where] = s
            mask[i, where] = 1
            if labels is not None:
                lab[i, where] = torch.tensor(labels[i], dtype=torch.long, device=self.device)
        return LLMInputs(embeds, mask, lab if labels is not None else None, prompt_lengths)

    # -- training -----------------------------------------------------------------------------
    def forward(self, audio: torch.Tensor, instructions: Sequence[str],
                answers: Sequence[str], weights: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy over the answer tokens (and their end token) only;
        ``weights`` [B] weighs each example's tokens (`answer_cross_entropy`).

        Audio longer than ``clip_s`` is cropped to its first ``clip_s`` (training crops).
        """
        batch = self.build_inputs(audio, instructions, answers, truncate=True)
        logits = self.llama_model(inputs_embeds=batch.inputs_embeds,
                                  attention_mask=batch.attention_mask).logits
        assert batch.labels is not None
        return answer_cross_entropy(logits, batch.labels, weights)

    # -- inference ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.train(was_training)

    def prompt_cache(self, audio: torch.Tensor | None, instructions: Sequence[str],
                     audio_embeds: torch.Tensor | None = None,
                     audio_index: Sequence[int] | None = None) -> PromptCache:
        """Run the prompts once (left-padded, batched) and keep their KV cache.

        Both `greedy_from` and `score_from` continue from it, so a record's prompt runs once
        for its answer and all of its candidate labels. ``audio_embeds`` (an `encode_audio`
        result, one row per placeholder) replaces ``audio``, so a clip encoded once serves
        every prompt about it.

        With ``audio_index`` (single-audio prompts), ``audio_embeds`` holds one row per clip
        and prompt ``i`` is about clip ``audio_index[i]``: the part of the prompt up to and
        including the audio (bos, user header, ``<Audio>``, audio tokens) is identical for
        every prompt about a clip, so it runs once per clip and only the rest of each prompt
        (``</Audio>``, the question, the assistant header) runs per prompt.
        """
        if audio_index is not None:
            if audio_embeds is None or audio is not None:
                raise ValueError("audio_index needs audio_embeds (one row per clip), not audio")
            index = [int(i) for i in audio_index]
            if len(index) != len(instructions) or any(
                    not 0 <= i < audio_embeds.shape[0] for i in index):
                raise ValueError(f"audio_index must give each of the {len(instructions)} "
                                 f"prompts one of the {audio_embeds.shape[0]} audios, got {index}")
            counts = [count_audios(q) for q in instructions]
            if any(c != 1 for c in counts):
                raise ValueError(f"audio_index is for prompts holding one audio each, these "
                                 f"hold {counts}; pass one audio_embeds row per placeholder")
            return self._shared_prompt_cache(audio_embeds, instructions, index)
        with self._inference():
            batch = self.build_inputs(audio, instructions, left_pad=True,
                                      audio_embeds=audio_embeds)
            mask = batch.attention_mask
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = self.llama_model(inputs_embeds=batch.inputs_embeds, attention_mask=mask,
                                   position_ids=positions, use_cache=True)
            logits = out.logits[:, -1].float()
        return PromptCache(out[self._cache_arg], mask, mask.sum(dim=1), logits)

    def _shared_prompt_cache(self, audio_embeds: torch.Tensor, instructions: Sequence[str],
                             index: list[int]) -> PromptCache:
        """`prompt_cache` with the audio prefix run once per (clip, text before the audio)."""
        heads, tails, groups, row_group = [], [], {}, []
        for q, clip in zip(instructions, index, strict=True):
            before, after = split_prompt(chat_prompt(q))
            head = (self.bos_id, *self._ids(before))
            key = (clip, head)
            if key not in groups:
                groups[key] = len(heads)
                heads.append(torch.cat([self._embed_ids(head),
                                        audio_embeds[clip].to(self.device, self.embed_dtype)]))
            row_group.append(groups[key])
            tails.append(self._ids(after))
        rows = len(instructions)
        with self._inference():
            prefix = self._pad(heads, None, [h.shape[0] for h in heads], left_pad=True)
            head_mask = prefix.attention_mask
            out = self.llama_model(inputs_embeds=prefix.inputs_embeds, attention_mask=head_mask,
                                   position_ids=(head_mask.cumsum(-1) - 1).clamp(min=0),
                                   use_cache=True)
            cache = out[self._cache_arg]
            which = torch.tensor(row_group, dtype=torch.long, device=self.device)
            cache.batch_select_indices(which)
            width = max(len(t) for t in tails)
            ids = torch.full((rows, width), self.pad_id, dtype=torch.long, device=self.device)
            tail_mask = torch.zeros(rows, width, dtype=torch.long, device=self.device)
            for r, t in enumerate(tails):
                ids[r, width - len(t):] = torch.tensor(t, dtype=torch.long, device=self.device)
                tail_mask[r, width - len(t):] = 1
            mask = torch.cat([head_mask[which], tail_mask], dim=1)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -width:]
            out = self.llama_model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                   use_cache=True, **{self._cache_arg: cache})
            logits = out.logits[:, -1].float()
        return PromptCache(out[self._cache_arg], mask, mask.sum(dim=1), logits)

    def greedy_from(self, prompt: PromptCache, max_new_tokens: int = 24) -> list[list[int]]:
        """Greedy answer token ids after each cached prompt, stop token excluded.

        The same decisions as ``generate_ids(num_beams=1)`` (argmax of the next-token logits
        over the tokenizer's vocabulary), decoded on a copy of the cache.
        """
        rows = prompt.logits.shape[0]
        answers: list[list[int]] = [[] for _ in range(rows)]
        done = [False] * rows
        vocab = len(self.tokenizer)
        cache = copy.deepcopy(prompt.cache)
        mask, positions, logits = prompt.mask, prompt.lengths.clone(), prompt.logits
        stops = set(self.stop_ids)
        with self._inference():
            for step in range(max_new_tokens):
                tokens = logits[:, :vocab].argmax(dim=-1).tolist()
                for b, t in enumerate(tokens):
                    if not done[b]:
                        done[b] = t in stops
                        if not done[b]:
                            answers[b].append(t)
                if all(done) or step == max_new_tokens - 1:
                    break
                feed = torch.tensor([[self.pad_id if d else t] for t, d in zip(tokens, done,
                                                                                 strict=True)],
                                    dtype=torch.long, device=self.device)
                mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
                out = self.llama_model(input_ids=feed, attention_mask=mask,
                                       position_ids=positions.unsqueeze(1), use_cache=True,
                                       **{self._cache_arg: cache})
                cache = out[self._cache_arg]
                positions = positions + 1
                logits = out.logits[:, -1].float()
        return answers

    def score_from(self, prompt: PromptCache, candidates: Sequence[Sequence[Sequence[int]]],
                   normalize: str = "sum", with_end: bool = True,
                   label_batch_size: int = 256) -> torch.Tensor:
        """`score_token_ids` after cached prompts: ``[B, max candidates]``, ragged rows padded
        with ``-inf``. The candidates of all rows run together, shortest first,
        ``label_batch_size`` sequences per forward, each over its own row of the prompt cache."""
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"unknown normalize {normalize!r}; known: {', '.join(NORMALIZATIONS)}")
        if len(candidates) != prompt.logits.shape[0]:
            raise ValueError(f"{prompt.logits.shape[0]} prompts but {len(candidates)} label sets")
        if label_batch_size < 1:
            raise ValueError(f"label_batch_size must be >= 1, got {label_batch_size}")
        pairs = []
        for b, row in enumerate(candidates):
            for j, c in enumerate(row):
                seq = list(c) + ([self.end_id] if with_end else [])
                if not seq:
                    raise ValueError("an empty label has no tokens to score (use with_end=True)")
                pairs.append((b, j, seq))
        pairs.sort(key=lambda pair: len(pair[2]))  # similar lengths share a forward: less padding
        width = max(len(row) for row in candidates)
        scores = torch.full((len(candidates), width), -math.inf)
        first = torch.log_softmax(prompt.logits, dim=-1)
        with self._inference():
            for start in range(0, len(pairs), label_batch_size):
                chunk = pairs[start:start + label_batch_size]
                total = self._score_chunk(prompt, first, [b for b, _, _ in chunk],
                                          [s for _, _, s in chunk])
                if normalize == "mean":
                    total = total / torch.tensor([len(s) for _, _, s in chunk],
                                                 dtype=torch.float32)
                for (b, j, _), value in zip(chunk, total.tolist(), strict=True):
                    scores[b, j] = value
        return scores

    def _score_chunk(self, prompt: PromptCache, first: torch.Tensor, rows: list[int],
                     seqs: list[list[int]]) -> torch.Tensor:
        """Sum of log-probs of each token sequence after the cached prompt of its row."""
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        total = first[index, torch.tensor([s[0] for s in seqs], device=self.device)].cpu()
        longest = max(len(s) for s in seqs)
        if longest == 1:
            return total
        k = len(seqs)
        inputs = torch.full((k, longest - 1), self.pad_id, dtype=torch.long, device=self.device)
        targets = torch.full((k, longest - 1), IGNORE, dtype=torch.long, device=self.device)
        tail = torch.zeros(k, longest - 1, dtype=torch.long, device=self.device)
        for i, s in enumerate(seqs):
            inputs[i, :len(s) - 1] = torch.tensor(s[:-1], device=self.device)
            targets[i, :len(s) - 1] = torch.tensor(s[1:], device=self.device)
            tail[i, :len(s) - 1] = 1
        mask = torch.cat([prompt.mask[index], tail], dim=1)
        positions = prompt.lengths[index].unsqueeze(1) + torch.arange(longest - 1,
                                                                       device=self.device)
        past = copy.deepcopy(prompt.cache)
        past.batch_select_indices(index)
        logits = self.llama_model(input_ids=inputs, attention_mask=mask, position_ids=positions,
                                  use_cache=True, **{self._cache_arg: past}).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        valid = targets != IGNORE
        picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return total + (picked * valid).sum(dim=1).cpu()

    def generate_ids(self, audio: torch.Tensor | None, instructions: Sequence[str],
                     max_new_tokens: int = 24, num_beams: int = 1,
                     audio_embeds: torch.Tensor | None = None) -> list[list[int]]:
        """Greedy (``num_beams=1``, `greedy_from`) or beam-search (transformers' ``generate``)
        answer token ids, stop token excluded.

        Embedding rows beyond the tokenizer's vocabulary (a built LLM may have spare rows)
        are never generated. ``audio_embeds``: see `prompt_cache`.
        """
        if num_beams == 1:
            return self.greedy_from(self.prompt_cache(audio, instructions, audio_embeds),
                                    max_new_tokens)
        from transformers import GenerationConfig

        with self._inference():
            batch = self.build_inputs(audio, instructions, left_pad=True,
                                      audio_embeds=audio_embeds)
            rows = self.llama_model.get_input_embeddings().weight.shape[0]
            unused = list(range(len(self.tokenizer), rows))  # rows no token decodes to
            gen = GenerationConfig(max_new_tokens=max_new_tokens, num_beams=num_beams,
                                   do_sample=False, eos_token_id=self.stop_ids,
                                   pad_token_id=self.pad_id, bos_token_id=self.bos_id,
                                   suppress_tokens=unused or None)
            out = self.llama_model.generate(inputs_embeds=batch.inputs_embeds,
                                            attention_mask=batch.attention_mask,
                                            generation_config=gen)
        results = []
        for row in out.tolist():
            ids = []
            for t in row:
                if t in self.stop_ids:
                    break
                ids.append(t)
            results.append(ids)
        return results

    def decode_answer(self, ids: Sequence[int]) -> str:
        """Answer text of generated ids (special tokens removed, whitespace stripped)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def generate(self, audio: torch.Tensor | None, instructions: Sequence[str],
                 max_new_tokens: int = 24, num_beams: int = 1,
                 audio_embeds: torch.Tensor | None = None) -> list[str]:
        """One answer per prompt (special tokens removed, whitespace stripped)."""
        ids = self.generate_ids(audio, instructions, max_new_tokens, num_beams, audio_embeds)
        return [self.decode_answer(x) for x in ids]

    def label_token_ids(self, labels: Sequence[str] | Sequence[Sequence[str]],
                        rows: int) -> list[list[list[int]]]:
        """Token ids of each row's labels (one label set for every row, or one per row)."""
        return [[self._ids(label) for label in row] for row in _label_sets(labels, rows)]

    def score_labels(self, audio: torch.Tensor | None, instructions: Sequence[str],
                     labels: Sequence[str] | Sequence[Sequence[str]], normalize: str = "sum",
                     with_end: bool = True, label_batch_size: int = 256,
                     audio_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Log-likelihood ``[B, L]`` of each candidate answer given audio and prompt.

        Args:
            audio: ``[B, T]`` (one audio per placeholder in order, see `build_inputs`).
            instructions: one prompt per row.
            labels: one label set for every row, or one per row (ragged sets are padded
                with ``-inf``).
            normalize: ``"sum"`` (answer log-likelihood) or ``"mean"`` (per token).
            with_end: include the end token, i.e. score the label as the *whole* answer.
            label_batch_size: candidate sequences (of all rows together) per forward.
            audio_embeds: `encode_audio` output used instead of ``audio`` (see `prompt_cache`).
        """
        ids = self.label_token_ids(labels, len(instructions))
        return self.score_token_ids(audio, instructions, ids, normalize, with_end,
                                    label_batch_size, audio_embeds)

    def score_token_ids(self, audio: torch.Tensor | None, instructions: Sequence[str],
                        candidates: Sequence[Sequence[Sequence[int]]], normalize: str = "sum",
                        with_end: bool = True, label_batch_size: int = 256,
                        audio_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """`score_labels` on token ids: ``candidates[b]`` is row b's list of token-id lists.

        The prompts run once, batched, with a KV cache (`prompt_cache`); the candidates of all
        rows then run in batches of ``label_batch_size`` over their rows of that cache.
        """
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"unknown normalize {normalize!r}; known: {', '.join(NORMALIZATIONS)}")
        if len(candidates) != len(instructions):
            raise ValueError(f"{len(instructions)} prompts but {len(candidates)} label sets")
        prompt = self.prompt_cache(audio, instructions, audio_embeds)
        return self.score_from(prompt, candidates, normalize, with_end, label_batch_size)


def _label_sets(labels: Sequence[str] | Sequence[Sequence[str]], rows: int) -> list[list[str]]:
    if isinstance(labels, str):
        raise TypeError("labels must be a sequence of label strings, not one string")
    if len(labels) == 0:
        raise ValueError("labels is empty")
    if all(isinstance(x, str) for x in labels):
        return [list(labels)] * rows  # type: ignore[arg-type]
    if len(labels) != rows:
        raise ValueError(f"{rows} prompts but {len(labels)} label sets")
    sets = [list(row) for row in labels]
    if any(len(row) == 0 or isinstance(row, str) for row in labels):
        raise ValueError("every label set must be a non-empty sequence of strings")
    return sets


# -- long recordings -------------------------------------------------------------------------
def clip_windows(n_samples: int, clip_samples: int, hop_samples: int) -> list[tuple[int, int]]:
    """Start / end samples of windows covering ``n_samples`` (the last one may be partial,
    it is zero-padded by the model); at least one window."""
    if not 0 < hop_samples <= clip_samples:
        raise ValueError(f"hop must be in (0, clip] = (0, {clip_samples}] samples so no audio "
                         f"is skipped, got {hop_samples}")
    starts = list(range(0, max(n_samples - clip_samples, 0) + 1, hop_samples))
    while starts[-1] + clip_samples < n_samples:
        starts.append(starts[-1] + hop_samples)
    return [(s, min(s + clip_samples, n_samples)) for s in starts]


def _windows(model: NatureLM, audio: torch.Tensor, hop_s: float | None
             ) -> tuple[list[tuple[int, int]], float]:
    if audio.dim() != 1:
        raise ValueError(f"a recording is one channel [samples], got shape {tuple(audio.shape)}")
    rate = model.cfg.sample_rate
    hop = model.cfg.clip_samples if hop_s is None else int(round(hop_s * rate))
    return clip_windows(audio.shape[0], model.cfg.clip_samples, hop), float(rate)


def _window_batches(audio: torch.Tensor, spans: list[tuple[int, int]], clip: int,
                    batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    for start in range(0, len(spans), batch_size):
        chunk = spans[start:start + batch_size]
        clips = torch.zeros(len(chunk), clip, dtype=torch.float32)
        for i, (a, b) in enumerate(chunk):
            clips[i, :b - a] = audio[a:b].float()
        yield start, clips


def generate_windows(model: NatureLM, audio: torch.Tensor, instruction: str,
                     hop_s: float | None = None, batch_size: int = 8,
                     max_new_tokens: int = 24, num_beams: int = 1) -> list[WindowAnswer]:
    """Answers for each ``clip_s`` window of a long ``audio[T]`` (hop ``hop_s``, default
    ``clip_s``); every window is reported with its start and end in seconds."""
    spans, rate = _windows(model, audio, hop_s)
    out: list[WindowAnswer] = []
    for start, clips in _window_batches(audio, spans, model.cfg.clip_samples, batch_size):
        texts = model.generate(clips, [instruction] * clips.shape[0], max_new_tokens, num_beams)
        for (a, b), text in zip(spans[start:start + len(texts)], texts, strict=True):
            out.append(WindowAnswer(a / rate, b / rate, text))
    return out


def score_windows(model: NatureLM, audio: torch.Tensor, instruction: str,
                  labels: Sequence[str], hop_s: float | None = None, batch_size: int = 8,
                  normalize: str = "sum") -> tuple[list[tuple[float, float]], torch.Tensor]:
    """``(windows as (start_s, end_s), scores[W, L])`` over a long ``audio[T]``."""
    spans, rate = _windows(model, audio, hop_s)
    rows = []
    for _, clips in _window_batches(audio, spans, model.cfg.clip_samples, batch_size):
        rows.append(model.score_labels(clips, [instruction] * clips.shape[0], labels,
                                       normalize=normalize))
    return [(a / rate, b / rate) for a, b in spans], torch.cat(rows, dim=0)
