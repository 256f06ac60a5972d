"""The ZeRO communication model against hand-computed cases."""

import pytest

from megatron_mobilellm.comm_model import Network, compute_seconds, main, pass_seconds, predict
from megatron_mobilellm.config import get_config
from megatron_mobilellm.training.metrics import flops_per_token

NET = Network(nvlink_gbs=360.0, nic_gbs=45.0, gpus_per_node=8)


def test_one_pass_is_the_nvlink_leg_plus_the_nic_leg():
    # 1e9 params in bf16 = 2e9 bytes; 4 nodes of 8: 7/8 of it over NVLink, 3/4 of each GPU's 1/8 slice over the NIC
    assert pass_seconds(2e9, 4, NET) == pytest.approx(7 / 8 * 2e9 / 360e9 + 3 / 4 * 2e9 / 8 / 45e9)
    assert pass_seconds(2e9, 1, NET) == pytest.approx(7 / 8 * 2e9 / 360e9)  # one node: NVLink only


@pytest.mark.parametrize("stage, passes", [(1, 2), (2, 2), (3, 3)])
def test_zero_stage_bytes_and_time(stage, passes):
    p = predict(params=10**9, stage=stage, nodes=4, compute_s=0.1, net=NET)
    assert p.gpus == 32
    assert p.bytes_per_gpu == pytest.approx(passes * 31 / 32 * 2e9)
    t = passes * (4.861111e-3 + 4.166667e-3)  # the pass above: 4.86 ms on NVLink + 4.17 ms on the NIC
    assert p.comm_s == pytest.approx(t, rel=1e-6)
    assert p.exposed_efficiency == pytest.approx(0.1 / (0.1 + t), rel=1e-6)
    assert p.overlapped_efficiency == pytest.approx(min(1.0, 0.1 / t), rel=1e-6)


def test_more_nodes_cost_more_and_stage3_most():
    small, large = (predict(10**9, 2, m, 0.1, NET) for m in (4, 32))
    assert large.comm_s > small.comm_s and large.exposed_efficiency < small.exposed_efficiency
    assert predict(10**9, 3, 32, 0.1, NET).comm_s == pytest.approx(1.5 * large.comm_s)
    with pytest.raises(ValueError):
        predict(10**9, 0, 4, 0.1, NET)


def test_compute_time_from_measurement_or_flops():
    assert compute_seconds("125M", 32, 2048, 350_000.0, 0.4, 989.0) == pytest.approx(32 * 2048 / 350_000)
    flops = 32 * 2048 * flops_per_token(get_config("125M"), 2048)
    assert compute_seconds("125M", 32, 2048, None, 0.4, 989.0) == pytest.approx(flops / (0.4 * 989e12))


def test_cli_prints_a_row_per_preset_and_stage(capsys):
    main(["--presets", "tiny", "125M", "--stages", "2", "3", "--nodes", "4", "32",
          "--tokens-per-sec", "125M=350000"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny") or
            line.startswith("| 125M")]
    assert len(rows) == 4 and all(line.count("%") == 2 for line in rows)
    with pytest.raises(SystemExit):
        main(["--tokens-per-sec", "nosuch=1"])
