"""Stop strings on streamed text: emit only text that can no longer become part of a stop string.

Text arrives in pieces (one detokenised token at a time), so a stop string can be split across
pieces. The matcher keeps back the longest tail of the text that is a prefix of some stop string;
everything before it is safe to emit. When a stop string appears, the text before its start is
emitted and the rest (the stop string and anything after it) is dropped. Empty stop strings are
ignored.
"""

from __future__ import annotations

from typing import Sequence


class StopMatcher:
    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in dict.fromkeys(stops) if s]
        self.matched: str | None = None  # the stop string that ended the text, once one has
        self._held = ""

    def push(self, text: str) -> str:
        """Add new text; return the part that is now safe to emit (never any part of a stop string)."""
        if self.matched is not None:
            return ""
        if not self.stops:
            return text
        buffer = self._held + text
        hit = self._earliest_stop(buffer)
        if hit is not None:
            start, stop = hit
            self.matched, self._held = stop, ""
            return buffer[:start]
        keep = self._longest_prefix_tail(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """End of generation without a stop string: the held-back text is ordinary text after all."""
        held, self._held = self._held, ""
        return "" if self.matched is not None else held

    def _earliest_stop(self, text: str) -> tuple[int, str] | None:
        hits = [(text.find(stop), stop) for stop in self.stops]
        found = [(pos, stop) for pos, stop in hits if pos >= 0]
        return min(found, key=lambda hit: hit[0]) if found else None

    def _longest_prefix_tail(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
