"""The one place that imports the generated gRPC code (generated at install time, never committed).

If the stubs are missing, say how to generate them instead of failing with a bare ImportError.
"""
from __future__ import annotations

try:
    from searchrec.v1 import searchrec_pb2 as pb
    from searchrec.v1 import searchrec_pb2_grpc as pb_grpc
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "generated gRPC stubs not found (searchrec/v1/searchrec_pb2.py); run `bash scripts/gen_protos.sh` "
        "or `bash scripts/setup.sh` from the repository root"
    ) from exc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SearchRecommend"].full_name

__all__ = ["pb", "pb_grpc", "SERVICE_NAME"]
