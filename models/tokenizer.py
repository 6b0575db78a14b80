"""Byte-level text tokenizer for the CLIP text tower.

Tokens 0-255 are the UTF-8 bytes of the text; 256/257/258 are SOT, EOT and PAD. There is no
vocabulary to train, ship or keep in step with the model, and no text is ever out of vocabulary:
emoji, accents and words never seen in training all encode (and decode back) exactly. The cost is
longer sequences than BPE (one token per byte), which is cheap at caption length.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

BYTE_TOKENS = 256
SOT, EOT, PAD = 256, 257, 258
VOCAB_SIZE = 259


class Tokenizer:
    """``encode`` → (N, context_length) LongTensor: SOT, bytes, EOT, then PAD.

    A text longer than ``context_length - 2`` bytes is cut so EOT stays the last real token; every
    cut is counted in ``self.truncated``.
    """

    sot, eot, pad, vocab_size = SOT, EOT, PAD, VOCAB_SIZE

    def __init__(self, context_length: int = 64):
        if context_length < 3:
            raise ValueError(f"context_length must be >= 3 (SOT, one byte, EOT), got {context_length}")
        self.context_length = context_length
        self.truncated = 0

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts, not one string")
        out = torch.full((len(texts), self.context_length), PAD, dtype=torch.long)
        room = self.context_length - 2
        for row, text in enumerate(texts):
            data = text.encode("utf-8")
            if len(data) > room:
                data = data[:room]
                self.truncated += 1
            ids = [SOT, *data, EOT]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: Any) -> str:
        """One row of ids → text; stops at EOT, skips SOT/PAD; a multi-byte character cut by
        truncation decodes as U+FFFD rather than raising."""
        values = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        data = bytearray()
        for value in values:
            if value == EOT:
                break
            if value < BYTE_TOKENS:
                data.append(value)
        return data.decode("utf-8", errors="replace")

    def state(self) -> dict[str, Any]:
        return {"kind": "bytes", "context_length": self.context_length, "sot": SOT, "eot": EOT, "pad": PAD,
                "vocab_size": VOCAB_SIZE}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Tokenizer":
        if state.get("kind") != "bytes" or (state.get("sot"), state.get("eot"), state.get("pad")) != (SOT, EOT, PAD):
            raise ValueError(f"not a byte tokenizer state this code reads: {state}")
        return cls(int(state["context_length"]))
