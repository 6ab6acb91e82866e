"""The searchrec gRPC server: `python -m server --bundle DIR --port N --device auto|cpu|cuda`.

Layers, imports running one way: `service` (protobuf <-> domain types, the only module that touches
generated code, through `stubs`) -> `runtime` (bundle swap) -> `batcher` + `engine` (retrieval,
ranking) -> `kernels`. `app` wires the gRPC server together; `config` is the one frozen config.
"""
