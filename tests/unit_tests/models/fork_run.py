"""torchrun for the tests, with each rank forked from an agent that has imported megatron-core.

    python -m tests.unit_tests.models.fork_run [torchrun flags] -m MODULE [args]

On 2 cores a rank spends ~4 s of CPU importing megatron-core (and the torch.compile machinery
its jit fuser pulls in) before it does anything; the suite starts several hundred ranks. Here
the agent imports them once and torch elastic forks the ranks (its ``fork`` start method for a
function entrypoint), which then run MODULE as ``__main__`` with the same environment torchrun
gives them. Only the tests use it: users and the end-to-end launcher tests run the real torchrun.
"""

import os
import runpy
import sys
import uuid
import warnings


def _rank_main(module: str, argv: list) -> None:
    sys.argv = [module, *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as stop:  # a rank's sys.exit(code): the process's exit status, as with torchrun
        code = stop.code
        if code not in (None, 0):
            if not isinstance(code, int):
                print(code, file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 1)


def main() -> None:
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, get_args_parser

    args = get_args_parser().parse_args()
    if not args.module:
        sys.exit("fork_run: only -m MODULE entrypoints")
    if args.standalone:
        # torch.distributed.run.run() does this before config_from_args(), which alone would
        # ignore --standalone and bind the static master port: a c10d store on a port the OS
        # picks as it binds, so no port chosen beforehand can be taken by another job.
        args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())
    with warnings.catch_warnings():  # shown once per job anyway (quiet_library_warnings)
        warnings.simplefilter("ignore")
        import examples.mimo.train_hetero  # noqa: F401
        import examples.mimo.training.hetero.loop  # noqa: F401
        import examples.mimo.training.hetero.runtime  # noqa: F401
    config, _, _ = config_from_args(args)
    config.start_method = "fork"
    elastic_launch(config, _rank_main)(args.training_script, list(args.training_script_args))


if __name__ == "__main__":
    main()
