#!/usr/bin/env bash
# Regenerate the OIP gRPC messages (python/src/tensorbridge/listeners/oip_pb2.py)
# from oip.proto with grpcio-tools. The generated files are committed: the wheel ships them
# and needs no protoc at build time. Run after editing oip.proto; commit the result.
set -euo pipefail
cd "$(dirname "$0")/../python/src"
python3 -m grpc_tools.protoc -I . --python_out=. tensorbridge/listeners/oip.proto
echo "regenerated tensorbridge/listeners/oip_pb2.py"
