"""The panel's logic on a BiomedSeg server: the same run, polled the same way, lands the same segments.

Real MRML classes (slicer-core), a real `biomedseg serve` process on loopback, the panel
controller driven as its QTimer drives it. Unreachable servers fail with a sentence unless the
person chose *Run locally if the server is unreachable*.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("slicer")
pytest.importorskip("fastapi")

from biomedseg import panel  # noqa: E402
from biomedseg import slicer_bridge as sb  # noqa: E402
from biomedseg.errors import ServerUnavailableError  # noqa: E402
from biomedseg.remote.client import RemoteWorkerClient  # noqa: E402
from biomedseg.worker.client import WorkerClient  # noqa: E402
from conftest import mrml_scene, worker_test_models  # noqa: E402
from remote_server import ServerProcess  # noqa: E402
from test_panel_logic import SPHERE, drive, small_volume  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with worker_test_models():
        proc = ServerProcess(tmp_path_factory.mktemp("panel-server")).start()
        yield proc
        proc.stop()


def run_panel(state: panel.PanelState, volume):
    with mrml_scene() as scene:
        node = sb.node_from_volume(scene, volume, "small")
        controller = panel.PanelController(scene)
        try:
            controller.start(state, node)
            outcome, progresses, _ = drive(controller)
            masks = {}
            if outcome.segmentation_node is not None:
                masks = {info["name"]: sb.segment_mask(outcome.segmentation_node, info["id"], node)
                         for info in sb.segments_of(outcome.segmentation_node)}
            return outcome, masks, type(controller._client), controller.notice
        finally:
            controller.close()


def test_the_panel_on_a_server_equals_a_local_run_and_an_unreachable_one_is_an_error_unless_chosen(server):
    volume = small_volume(seed=4)
    state = dict(model="test-model", prompts=["target", "bright"], options=dict(SPHERE), show_3d=False)
    remote, remote_masks, kind, notice = run_panel(
        panel.PanelState(server_url=server.url, server_token=server.token, **state), volume)
    assert kind is RemoteWorkerClient and notice == ""
    unreachable = dict(state, server_url="http://127.0.0.1:9", server_token="t" * 43)
    with mrml_scene() as scene:
        node = sb.node_from_volume(scene, volume, "small")
        controller = panel.PanelController(scene)
        with pytest.raises(ServerUnavailableError, match="cannot be reached"):
            controller.start(panel.PanelState(**unreachable), node)
        assert not controller.running
        controller.close()
    with worker_test_models():  # the person chose "Run locally if the server is unreachable": a local worker
        local, local_masks, local_kind, local_notice = run_panel(panel.PanelState(fallback_local=True,
                                                                                  **unreachable), volume)
    assert local_kind is WorkerClient and "Running on this computer instead" in local_notice
    assert "cannot be reached" in local.summary  # the panel's result line says where it ran
    assert remote.state == local.state == "done", (remote.summary, local.summary)
    assert sorted(remote_masks) == sorted(local_masks) == ["bright", "target"]
    for name in local_masks:
        assert local_masks[name].any()
        assert np.array_equal(remote_masks[name], local_masks[name]), name
