"""The searchrec gRPC server: `python -m server --bundle DIR --port N --device auto|cpu|cuda`.

Layers, imports running one way: `service` (protobuf <-> domain types, the only module that touches
generated code, through `stubs`) -> `runtime` (bundle swap) -> `batcher` + `engine` (retrieval,
ranking) -> `kernels`. `app` wires the gRPC server together; `config` is the one frozen config.
"""

import time as _time

# When `python -m server` began importing (the interpreter's own start is ~50 ms earlier): start-up is
# reported from here, imports included. The process's creation time would be wrong under `exec` from a
# script that did other work first (scripts/quickstart.sh builds a bundle, then execs the server).
IMPORTED_AT = _time.time()
