"""Auction ids: what one ad slot sold, signed, so that a click carries its own price.

`<base64url payload>.<base64url HMAC-SHA256, 16 bytes>`; the payload is the JSON array
`["v1", campaign, item, price, day, served_ms, slot, nonce]`. Nothing is stored per auction: the Feedback that reports an
impression or a click verifies the signature and reads the campaign, item and price from the id (a forged or
altered id is refused). The key is kept with the state (every replica and a restart read the same one).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from dataclasses import dataclass

VERSION = "v1"


@dataclass(frozen=True)
class Sold:
    campaign_id: str
    item_id: str
    price: float
    day: int
    served_ms: int
    slot: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class AuctionTokens:
    def __init__(self, key: bytes) -> None:
        self.key = key

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self.key, b"auction|" + body, hashlib.sha256).digest()[:16]

    def issue(self, sold: Sold) -> str:
        body = json.dumps([VERSION, sold.campaign_id, sold.item_id, float(sold.price), sold.day, sold.served_ms,
                           sold.slot, os.urandom(6).hex()], separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        return f"{_b64(body)}.{_b64(self._mac(body))}"

    def read(self, token: str) -> Sold:
        """The sale an auction id names; ValueError (with the reason) when it is not one of ours."""
        try:
            body_b64, mac_b64 = token.split(".")
            body, mac = _unb64(body_b64), _unb64(mac_b64)
        except (ValueError, TypeError) as exc:
            raise ValueError("it is not an auction id (damaged or not issued by this engine)") from exc
        if not hmac.compare_digest(mac, self._mac(body)):
            raise ValueError("its signature does not match (forged, altered or issued with another key)")
        parts = json.loads(body.decode("utf-8"))
        if not isinstance(parts, list) or len(parts) != 8 or parts[0] != VERSION:
            raise ValueError("it is not an auction id of this version")
        return Sold(str(parts[1]), str(parts[2]), float(parts[3]), int(parts[4]), int(parts[5]), int(parts[6]))
