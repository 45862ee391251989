"""What every EVM adapter shares: the deploying account, and constructor arguments as
a deployment's transaction carries them."""

from __future__ import annotations

import binascii
from dataclasses import dataclass
from typing import Any

from engine.errors import PermanentError

WORD_BYTES = 32


@dataclass(frozen=True)
class Deployer:
    """The account that signs deployments, on one chain, and how many transactions the
    node counts for it so far, pending ones included (the next free nonce, as it sees it)."""

    chain_id: int
    address: str
    pending_nonce: int


def encode_constructor_args(args: list[Any]) -> str:
    """ABI-encode constructor arguments given as unsigned integers or 32-byte hex words."""
    words = []
    for arg in args:
        if isinstance(arg, bool) or not isinstance(arg, int | str):
            raise PermanentError(
                f"constructor argument {arg!r}: give an unsigned integer or a 32-byte hex word"
            )
        if isinstance(arg, int):
            if arg < 0 or arg >= 2 ** (8 * WORD_BYTES):
                raise PermanentError(f"constructor argument {arg} does not fit a uint256")
            words.append(arg.to_bytes(WORD_BYTES, "big").hex())
        else:
            try:
                word = binascii.unhexlify(arg.removeprefix("0x"))
            except (binascii.Error, ValueError):
                raise PermanentError(f"constructor argument {arg!r} is not hex") from None
            if len(word) != WORD_BYTES:
                raise PermanentError(f"constructor argument {arg!r} is not a 32-byte word")
            words.append(word.hex())
    return "".join(words)
