"""Kept prompt prefixes: the K/V of recent prompts on the GPU, so that a prompt which begins like one of them is
prefilled only from where the two part.

Every prompt starts with its database's schema (starsql.prompt), then the conversation's earlier turns, then the
question: people asking about one database share most of their prompts' tokens, and a follow-up shares all of the
turn before it. A token's K/V depend only on the tokens up to it, so up to the first token where two prompts differ,
the K/V kept from one are those the other's own forward would compute. The batched decoder (batched.py) finds each
arriving prompt's longest shared prefix here, copies those K/V into the prompt's slot and runs the model over the
rest of the prompt only; then it keeps the new prompt. The store has buffers of its own: a slot's rows are rewritten
as soon as it is free. DECODE_PREFIXES sets how many prompts are kept (0: none, every prompt prefilled whole).
"""

import torch


class PrefixStore:
    """The K/V of the last `entries` prompts kept, per layer, each entry shaped as a slot of the decoder's cache
    (`slot_shape`: heads, positions, head dim), in its dtype and on its device; `find` looks for a new prompt's
    longest shared prefix, `restore` copies it into a slot, `keep` copies a slot's prompt in. Only the batched
    decoder's engine thread calls it. Copies move whole slots: every layer's in one foreach copy (a few kernels,
    where copying each layer's first positions alone would launch two kernels a layer); the positions past the
    prompt that come along are garbage the slot's own prefill and steps overwrite, and its mask hides."""

    def __init__(self, entries: int, layers: int, slot_shape: tuple[int, int, int], dtype, device):
        if entries < 1:
            raise ValueError(f"a prefix store keeps at least 1 prompt, not {entries}")
        shape = (entries, *slot_shape)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.length = slot_shape[1] - 1  # prompt tokens an entry keeps (a slot's last position is its spare)
        self.prompts: list[torch.Tensor | None] = [None] * entries  # each entry's prompt ids (1-D, on the host)
        self.used = [0] * entries  # when each entry was last found or kept: the least recently used goes first
        self._clock = 0

    def _touch(self, entry: int):
        self._clock += 1
        self.used[entry] = self._clock

    @staticmethod
    def _shared(kept: torch.Tensor, ids: torch.Tensor, most: int) -> int:
        """How many first tokens `kept` and `ids` share, at most `most`."""
        most = min(most, len(kept), len(ids))
        differ = torch.nonzero(kept[:most] != ids[:most])
        return int(differ[0]) if len(differ) else most

    def find(self, input_ids: torch.Tensor) -> tuple[int, int]:
        """(entry, tokens): the kept prompt that shares the longest prefix with `input_ids`, and how many tokens
        that is: all but the prompt's last token at most (the model must run on one to predict the next); (-1, 0)
        if none shares a token."""
        ids = input_ids.view(-1).cpu()
        best, most = (-1, 0), len(ids) - 1
        for entry, kept in enumerate(self.prompts):
            if kept is not None and (shared := self._shared(kept, ids, most)) > best[1]:
                best = (entry, shared)
        if best[0] >= 0:
            self._touch(best[0])
        return best

    def restore(self, entry: int, keys: list[torch.Tensor], values: list[torch.Tensor], slot: int):
        """Copy the entry into `slot` of the decoder's cache (`keys`, `values`: a tensor per layer, slots first): the
        prefix `find` found, and positions past it that the slot's prefill overwrites."""
        torch._foreach_copy_([k[slot] for k in keys] + [v[slot] for v in values],
                             [k[entry] for k in self.keys] + [v[entry] for v in self.values])  # fmt: skip

    def keep(self, input_ids: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], slot: int):
        """Keep the prompt whose K/V `slot` holds (its first len(input_ids) positions): in place of a kept prompt
        it extends (a conversation's turn before it), else of the least recently used; not at all if a kept prompt
        already begins with all of it, or if it is longer than an entry keeps."""
        ids = input_ids.view(-1).cpu()
        tokens = len(ids)
        if tokens > self.length:
            return
        entry = None
        for index, kept in enumerate(self.prompts):
            if kept is None:
                continue
            shared = self._shared(kept, ids, tokens)
            if shared == tokens:  # a kept prompt begins with this whole one: nothing new
                self._touch(index)
                return
            if shared == len(kept):  # this one extends a kept prompt: it takes that entry
                entry = index
        if entry is None:
            entry = min(range(len(self.prompts)), key=lambda index: (self.prompts[index] is not None, self.used[index]))
        torch._foreach_copy_([k[entry] for k in self.keys] + [v[entry] for v in self.values],
                             [k[slot] for k in keys] + [v[slot] for v in values])  # fmt: skip
        self.prompts[entry] = ids.clone()
        self._touch(entry)
