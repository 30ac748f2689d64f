"""The curated public API imports, and every name in __all__ exists."""

import quasistatic


def test_every_public_name_imports():
    missing = [name for name in quasistatic.__all__ if not hasattr(quasistatic, name)]
    assert missing == []
    assert len(set(quasistatic.__all__)) == len(quasistatic.__all__)


def test_registries_are_public_and_populated():
    assert {"digits", "mnist", "cifar10"} <= set(quasistatic.available_datasets())
    assert {"mlp", "resnet18"} <= set(quasistatic.available_architectures())
    assert {"cg", "minres", "direct"} <= set(quasistatic.available_solvers())
    assert {"euler", "heun", "rk4", "dopri5"} <= set(quasistatic.available_integrators())
    assert {"none", "newton", "equilibrate"} <= set(quasistatic.available_correctors())
    assert {"iso-classification", "iso-c-rate", "geodesic-transfer"} <= set(quasistatic.available_processes())


def test_transfer_is_public():
    assert {"TransferData", "TransferObjectives", "make_transfer_process", "plot_transfer", "train_baseline",
            "transfer_data"} <= set(quasistatic.__all__)


def test_the_runner_is_public():
    assert {"RunConfig", "DataConfig", "StartConfig", "ProcessConfig", "FollowConfig", "Run", "run_process",
            "Networks", "LinearSolveConfig"} <= set(quasistatic.__all__)


def test_data_parallelism_is_public():
    assert "ShardGroup" in quasistatic.__all__
