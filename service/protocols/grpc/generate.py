"""The Python stubs of `proto/*.proto`, generated with grpcio-tools (a development dependency):
`python -m service.protocols.grpc.generate [folder]` (`make grpc-stubs`) writes them beside the
`.proto` files, or under `folder`, which the stubs test compares with the committed ones."""
import sys
from pathlib import Path

ROOT = Path(__file__).parents[3]  # the checkout: the stubs import each other by package path
PROTOS = sorted((Path(__file__).parent / "proto").glob("*.proto"))


def generate(out: Path = ROOT) -> None:
    from grpc_tools import protoc  # only where the stubs are built

    protos = [str(p.relative_to(ROOT)) for p in PROTOS]
    status = protoc.main(["grpc_tools.protoc", f"-I{ROOT}", f"--python_out={out}",
                          f"--pyi_out={out}", f"--grpc_python_out={out}", *protos])
    if status != 0:
        raise SystemExit(f"protoc failed with status {status}")
    for proto in PROTOS:  # into the package's own descriptor pool (see proto/__init__.py)
        module = out / proto.relative_to(ROOT).with_name(proto.stem + "_pb2.py")
        module.write_text(module.read_text().replace(
            "_descriptor_pool.Default()", "__import__('service.protocols.grpc.proto').protocols.grpc.proto.POOL"))


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
