"""`resfast` command line: info, summary, fuse-report, train, reproduce, bench."""
import sys

USAGE = """usage: resfast COMMAND [ARGS]

commands:
  info                what was built: CUDA archs, kernels, versions, the GPU
  summary NAME        layers, output shapes, parameters and multiply-adds of a model
  fuse-report NAME    what resfast.fuse fuses in a torchvision or timm model, and why not the rest
  train [OPTIONS]     train a network end to end (resfast train --help)
  reproduce WHAT      reproduce a paper's experiment (resfast reproduce degradation)
  bench [OPTIONS]     throughput against torch eager and torch.compile (resfast bench --help)
"""


def _info(argv):
    import resfast
    from resfast._info import format_info

    print(format_info(resfast.info()))
    return 0


def _summary(argv):
    from resfast.models.summary import summary_main

    return summary_main(argv)


def _fuse_report(argv):
    from resfast.fusion.cli import fuse_report_main

    return fuse_report_main(argv)


def _train(argv):
    from resfast.train import train_main

    return train_main(argv)


def _reproduce(argv):
    from resfast.reproduce import reproduce_main

    return reproduce_main(argv)


def _bench(argv):
    from resfast.bench import bench_main

    return bench_main(argv)


COMMANDS = {"info": _info, "summary": _summary, "fuse-report": _fuse_report, "train": _train,
            "reproduce": _reproduce, "bench": _bench}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"resfast: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return command(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
