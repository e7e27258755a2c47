"""The committed gRPC stubs are what `make proto` generates from the .proto today."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO = "protos/loraserve/v1/inference.proto"
GENERATED = ["inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py"]


def test_generated_stubs_are_up_to_date(tmp_path):
    # as `make proto` runs it: -I protos, so the stubs import each other as loraserve.v1
    (tmp_path / "loraserve/v1").mkdir(parents=True)
    (tmp_path / "loraserve/v1/inference.proto").write_bytes((ROOT / PROTO).read_bytes())
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            ".",
            "--python_out=.",
            "--pyi_out=.",
            "--grpc_python_out=.",
            "loraserve/v1/inference.proto",
        ],
        cwd=tmp_path,
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "loraserve/v1" / name).read_text()
        committed = (ROOT / "protos/loraserve/v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run `make proto` and commit the result"


def test_every_field_and_rpc_is_documented():
    lines = (ROOT / PROTO).read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        s = line.strip()
        is_field = s.endswith(";") and "=" in s and not s.startswith(("//", "syntax", "package"))
        is_rpc = s.startswith("rpc ")
        if (is_field or is_rpc) and "_UNSPECIFIED" not in s:
            above = lines[i - 1].strip()
            # a field may share the comment of the group directly above it
            if not (above.startswith("//") or (above.endswith(";") and "=" in above)):
                undocumented.append(s)
    assert not undocumented, undocumented
