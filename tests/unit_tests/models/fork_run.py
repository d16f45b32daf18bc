"""torchrun for the tests, with each rank forked from an agent that has imported megatron-core.

    python -m tests.unit_tests.models.fork_run [torchrun flags] -m MODULE [args]

On 2 cores a rank spends ~4 s of CPU importing megatron-core (and the torch.compile machinery
its jit fuser pulls in) before it does anything; the suite starts several hundred ranks. Here
the agent imports them once and torch elastic forks the ranks (its ``fork`` start method for a
function entrypoint), which then run MODULE as ``__main__`` with the same environment torchrun
gives them. Only the tests use it: users and the end-to-end launcher tests run the real torchrun.
"""

import faulthandler
import os
import runpy
import signal
import sys
import warnings


def _rank_main(module: str, argv: list) -> None:
    # The agent stops the ranks with SIGTERM when one failed; its Python handler never runs in a
    # rank blocked in C (a store wait), so each rank first prints where its threads were.
    # train_hetero's own exit-signal handler, once installed, replaces this one.
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
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
    from torch.distributed import TCPStore
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, get_args_parser

    args = get_args_parser().parse_args()
    if not args.module:
        sys.exit("fork_run: only -m MODULE entrypoints")
    if args.standalone:
        # A port the OS picks as the agent's store binds it, so no port chosen beforehand can be
        # taken by the other pytest worker's job. Not torchrun's own --standalone: its c10d
        # rendezvous forks the ranks beside a keep-alive thread and a second store, and under it
        # one CI job's fourth rank never reached the default group's store (not reproduced
        # since). The static rendezvous's store (multi_tenant) reuses this server, which lives
        # as long as this local: until the job ends.
        store = TCPStore("127.0.0.1", 0, is_master=True, multi_tenant=True, wait_for_workers=False)
        args.standalone, args.master_addr, args.master_port = False, "127.0.0.1", store.port
    with warnings.catch_warnings():  # shown once per job anyway (quiet_library_warnings)
        warnings.simplefilter("ignore")
        import examples.mimo.train_hetero  # noqa: F401
        import examples.mimo.training.hetero.loop  # noqa: F401
        import examples.mimo.training.hetero.runtime  # noqa: F401
    config, _, _ = config_from_args(args)
    import torch

    # Forking is what saves the imports; but a process whose imports touched CUDA (mamba-ssm's
    # Triton kernels do) cannot hand it to a forked child, so a machine with GPUs spawns.
    config.start_method = "spawn" if torch.cuda.is_available() else "fork"
    elastic_launch(config, _rank_main)(args.training_script, list(args.training_script_args))


if __name__ == "__main__":
    main()
