"""The web app at the API level (FastAPI's TestClient, no network): frame tags and ordering, epochs after a
reset, switches taking effect at a later block, counted drops for a slow client, lossless recording, replay
of what was streamed, and the safety rules (busy, limits, malformed messages, tokens, closed tabs)."""
import io
import json
import threading
import time

import numpy as np
import pytest

from fastapi.testclient import TestClient

from reward_forcing.build import build_pipeline
from reward_forcing.config import load_config
from reward_forcing.interactive import Reset, Session, SetPrompt, SetSeed
from reward_forcing.serve import ServeOptions, create_app
from reward_forcing.serve.stream import BlockQueue, ModelWorker, encode_jpeg
from reward_forcing.video_io import pixels_to_uint8, read_video
from conftest import REPO_ROOT

SIZE = dict(height=16, width=32)  # small frames keep a block ~20 ms on one CPU thread


@pytest.fixture(scope="module")
def pipe():
    return build_pipeline(load_config(REPO_ROOT / "configs" / "tiny.yaml"))


@pytest.fixture
def client(pipe, tmp_path):
    app = create_app(pipe, ServeOptions(**SIZE, record_dir=tmp_path / "rec", max_prompt_chars=50,
                                        max_upload_bytes=20_000))
    with TestClient(app) as c:
        yield c
    assert _model_threads_end(), "a model thread outlived its client"


def _model_threads_end(seconds=10.0) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline and [t for t in threading.enumerate() if t.name == "model"]:
        time.sleep(0.02)
    return not [t for t in threading.enumerate() if t.name == "model"]


class Peer:
    """A scripted browser: collects frames (tag + JPEG) and JSON messages; acks blocks unless told not to."""

    def __init__(self, ws, ack=True):
        self.ws, self.ack = ws, ack
        self.frames, self.messages = [], []

    def send(self, **message):
        self.ws.send_text(json.dumps(message))

    def pump(self):
        message = self.ws.receive()
        if message.get("bytes") is not None:
            data = message["bytes"]
            tag = tuple(int.from_bytes(data[i:i + 4], "little") for i in range(0, 16, 4))
            self.frames.append((tag, data[16:]))
            if self.ack and tag[2] == 0:
                self.send(type="ack", block=tag[1])
        else:
            self.messages.append(json.loads(message["text"]))

    def until(self, condition, limit=2000):
        for _ in range(limit):
            if condition():
                return
            self.pump()
        raise AssertionError(f"condition not met; messages: {self.messages[-5:]}")

    def of_type(self, kind):
        return [m for m in self.messages if m["type"] == kind]

    def blocks(self):
        """(epoch, block) -> number of frames received."""
        out = {}
        for (epoch, block, _, _), _ in self.frames:
            out[(epoch, block)] = out.get((epoch, block), 0) + 1
        return out


def _start(ws, **kw):
    peer = Peer(ws, **kw)
    peer.until(lambda: peer.of_type("hello"))
    peer.send(type="start", prompt="a red car", seed=3)
    return peer


def test_frames_are_tagged_and_ordered_and_a_reset_starts_a_new_epoch(client):
    with client.websocket_connect("/ws") as ws:
        peer = _start(ws)
        hello = peer.of_type("hello")[0]
        assert (hello["height"], hello["width"], hello["fps"]) == (16, 32, 16)
        peer.until(lambda: len(peer.blocks()) >= 3)
        peer.send(type="reset", prompt="waves", seed=1)
        peer.until(lambda: any(e == 1 for e, _ in peer.blocks()) and len(peer.blocks()) >= 6)
        tags = [t for t, _ in peer.frames]
        assert tags == sorted(tags)  # (epoch, block, frame) never goes back
        counts = peer.blocks()
        first_new = min(b for e, b in counts if e == 1)
        assert counts[(0, 0)] == 9 and counts[(1, first_new)] == 9  # each video's first block: 1 + 4 * 2
        assert all(n == 12 for (e, b), n in counts.items() if b not in (0, first_new) and (e, b) != max(counts))
        assert all(t[3] == counts[(t[0], t[1])] for t in tags if (t[0], t[1]) != max(counts))
        applied = [m for m in peer.of_type("applied") if m["events"][0]["kind"] == "Reset"]
        assert applied[0]["block"] == first_new and applied[0]["epoch"] == 1
        jpeg = peer.frames[-1][1]
        from PIL import Image
        assert Image.open(io.BytesIO(jpeg)).size == (32, 16)


def test_a_prompt_switch_takes_effect_at_a_later_block(client):
    with client.websocket_connect("/ws") as ws:
        peer = _start(ws)
        peer.until(lambda: len(peer.blocks()) >= 2)
        sent_after = max(b for _, b in peer.blocks())
        peer.send(type="prompt", text="a blue boat", policy="recache", blend=2)
        peer.until(lambda: peer.of_type("applied"))
        event = peer.of_type("applied")[0]
        assert event["block"] > sent_after
        assert event["events"] == [{"kind": "SetPrompt", "block": event["block"], "text": "a blue boat",
                                    "policy": "recache", "blend_blocks": 2}]


def test_a_slow_client_gets_whole_blocks_and_counted_drops(client):
    with client.websocket_connect("/ws") as ws:
        peer = _start(ws, ack=False)  # never acknowledges: only the first in-flight blocks are sent
        peer.until(lambda: any(m["drops"] >= 3 for m in peer.of_type("status")))
        counts = peer.blocks()
        assert sorted(counts) == [(0, 0), (0, 1)] and counts[(0, 0)] == 9 and counts[(0, 1)] == 12
        status = peer.of_type("status")[-1]
        assert status["queue"] <= 2 and status["in_flight"] == 2
        # acknowledging resumes the stream with the newest blocks: the dropped ones never arrive
        peer.ack = True
        peer.send(type="ack", block=0)
        peer.send(type="ack", block=1)
        peer.until(lambda: len(peer.blocks()) >= 4)
        received = sorted(b for _, b in peer.blocks())
        assert received[2] > 2 and all(n in (9, 12) for n in list(peer.blocks().values())[:-1])


def test_recording_is_lossless_and_holds_exactly_the_streamed_frames(client, tmp_path):
    with client.websocket_connect("/ws") as ws:
        peer = _start(ws, ack=False)  # a slow client: without recording, blocks would be dropped
        # both in-flight blocks fully received, so recording starts on a block boundary after the 9-frame block 0
        peer.until(lambda: peer.blocks().get((0, 0)) == 9 and peer.blocks().get((0, 1)) == 12)
        peer.send(type="record", on=True)
        peer.until(lambda: [m for m in peer.of_type("recording") if m["on"]])
        streamed_before = len(peer.frames)
        drops_before = peer.of_type("status")[-1]["drops"] if peer.of_type("status") else 0
        for block in range(2):
            peer.send(type="ack", block=block)
        peer.ack = True
        peer.until(lambda: len(peer.blocks()) >= 6)
        peer.send(type="record", on=False)
        peer.until(lambda: [m for m in peer.of_type("recording") if not m["on"]])
        done = [m for m in peer.of_type("recording") if not m["on"]][0]
        streamed = peer.frames[streamed_before:]
        assert done["frames"] >= 36 and done["frames"] % 12 == 0 and done["frames"] <= len(streamed)
        assert [tag[3] for tag, _ in streamed[:done["frames"]]].count(12) == done["frames"]
        response = client.get(done["url"])
        assert response.status_code == 200 and response.headers["content-type"] == "video/mp4"
        (tmp_path / "got.mp4").write_bytes(response.content)
        frames, fps = read_video(tmp_path / "got.mp4")
        assert frames.shape == (done["frames"], 16, 32, 3) and fps == 16
        peer.until(lambda: peer.of_type("status")[-1]["blocks"] > 8)
        recorded_blocks = done["frames"] // 12
        assert recorded_blocks >= 3 and drops_before <= peer.of_type("status")[-1]["drops"]


def test_streamed_frames_replay_bit_identically(client, pipe):
    """The applied events, replayed on a fresh session, give the very frames that were streamed."""
    with client.websocket_connect("/ws") as ws:
        peer = _start(ws)
        peer.send(type="record", on=True)  # lossless: every block arrives
        peer.until(lambda: len(peer.blocks()) >= 2)
        peer.send(type="prompt", text="a blue boat", policy="recache_sink")
        peer.until(lambda: len(peer.blocks()) >= 4)
        peer.send(type="seed", seed=5)
        peer.until(lambda: len(peer.of_type("applied")) >= 2 and len(peer.blocks()) >= 7)
    kinds = {"SetPrompt": SetPrompt, "SetSeed": SetSeed, "Reset": Reset}
    events = [kinds[e.pop("kind")](**e) for m in peer.of_type("applied") for e in m["events"]]
    n_blocks = max(b for _, b in peer.blocks()) + 1
    replay = Session(pipe, "a red car", seed=3, events=events, **SIZE).blocks(n_blocks)
    expected = {(b.epoch, b.index, i): encode_jpeg(f) for b in replay
                for i, f in enumerate(pixels_to_uint8(b.frames[0]).numpy())}
    received = {tag[:3]: jpeg for tag, jpeg in peer.frames}
    assert received and all(expected[key] == jpeg for key, jpeg in received.items())


def test_pause_and_resume(client):
    with client.websocket_connect("/ws") as ws:
        peer = _start(ws)
        peer.until(lambda: peer.blocks())
        peer.send(type="pause")
        peer.until(lambda: peer.of_type("paused") and peer.of_type("status")[-1]["paused"])
        generated = peer.of_type("status")[-1]["blocks"]
        time.sleep(0.3)
        n = len(peer.of_type("status"))
        peer.until(lambda: len(peer.of_type("status")) > n)
        assert peer.of_type("status")[-1]["blocks"] == generated  # nothing generated while paused
        peer.send(type="resume")
        peer.until(lambda: peer.of_type("status")[-1]["blocks"] > generated)
        assert [m["paused"] for m in peer.of_type("paused")] == [True, False]


# ------------------------------------------------------------------------------------------ safety
def test_malformed_messages_get_an_error_and_the_connection_stays_up(client):
    with client.websocket_connect("/ws") as ws:
        peer = Peer(ws)
        peer.until(lambda: peer.of_type("hello"))
        peer.send(type="prompt", text="x")  # before start
        ws.send_text("{nope")
        peer.send(type="warp")
        peer.send(type="start", prompt="x" * 51)
        peer.send(type="start", prompt="a car", seed=-1)
        peer.send(type="start", prompt="a car", seed=0)
        peer.send(type="prompt", text="a cat", policy="swap")
        peer.send(type="prompt", text="a cat", blend=True)
        peer.send(type="sink_alpha", alpha=2)
        peer.send(type="start", prompt="a car")
        peer.until(lambda: len(peer.of_type("error")) >= 9)
        errors = [m["message"] for m in peer.of_type("error")]
        for expected in ["send 'start' before 'prompt'", "not JSON", "unknown message type 'warp'",
                         "the prompt has 51 characters; the limit is 50", "'seed' must be a whole number",
                         "policy 'swap' is not one of", "'blend' must be a whole number in [0, 64], got True",
                         "ema_alpha must be in [0, 1], got 2", "already started"]:
            assert any(expected in e for e in errors), (expected, errors)
        peer.until(lambda: peer.blocks())  # still streaming


def test_image_uploads_are_checked_and_restart_from_the_image(client):
    from PIL import Image

    def encoded(fmt, size=(40, 20)):
        buffer = io.BytesIO()
        Image.fromarray(np.full((size[1], size[0], 3), 90, np.uint8)).save(buffer, format=fmt)
        return buffer.getvalue()

    with client.websocket_connect("/ws") as ws:
        peer = _start(ws)
        peer.until(lambda: peer.blocks())
        ws.send_bytes(encoded("GIF"))
        ws.send_bytes(b"\x89PNG garbage")
        ws.send_bytes(b"x" * 20_001)
        ws.send_bytes(encoded("PNG"))
        peer.until(lambda: len(peer.of_type("error")) >= 3 and any(
            e["kind"] == "Reset" for m in peer.of_type("applied") for e in m["events"]))
        errors = " | ".join(m["message"] for m in peer.of_type("error"))
        assert "is GIF; use one of PNG, JPEG, WEBP, BMP" in errors and "not a readable image" in errors
        assert "the image has 20001 bytes; the limit is 20000" in errors
        assert peer.of_type("notice")[0]["message"] == "start image resized 40x20 to 32x16"
        reset = [m for m in peer.of_type("applied") if m["events"][0]["kind"] == "Reset"][0]
        assert reset["events"][0]["image"] == "<image>"
        peer.until(lambda: (1, reset["block"]) in peer.blocks() and (1, reset["block"] + 1) in peer.blocks())
        assert peer.blocks()[(1, reset["block"])] == 12  # continues from the image: no 9-frame first block


def test_one_session_per_process_and_a_closed_tab_stops_generation(client):
    with client.websocket_connect("/ws") as first:
        peer = _start(first)
        peer.until(lambda: peer.blocks())
        with client.websocket_connect("/ws") as second:
            busy = json.loads(second.receive_text())
            assert busy["type"] == "busy" and "busy" in busy["message"]
    assert _model_threads_end()
    with client.websocket_connect("/ws") as again:  # free again
        assert json.loads(again.receive_text())["type"] == "hello"


def test_a_page_reload_is_handed_over_not_refused(client, monkeypatch):
    generate = ModelWorker._generate_one

    def slow(self):  # a block that takes a while, as on a big model: the old stream winds down slowly
        time.sleep(0.3)
        generate(self)

    monkeypatch.setattr(ModelWorker, "_generate_one", slow)
    with client.websocket_connect("/ws") as first:
        peer = _start(first)
        peer.until(lambda: peer.blocks())
        first.close()  # the reload: the old page's socket closes, its model thread is still mid-block...
        with client.websocket_connect("/ws") as reloaded:  # ...when the new page connects
            peer = _start(reloaded)
            peer.until(lambda: peer.blocks())
            assert not peer.of_type("busy") and not peer.of_type("error")


def test_display_scale_enlarges_frames_nearest_neighbour(pipe, tmp_path):
    from PIL import Image

    app = create_app(pipe, ServeOptions(**SIZE, display_scale=3, record_dir=tmp_path, start_prompt="red fast up"))
    with TestClient(app) as c, c.websocket_connect("/ws") as ws:
        peer = _start(ws)
        assert (peer.of_type("hello")[0]["height"], peer.of_type("hello")[0]["width"]) == (48, 96)
        assert peer.of_type("hello")[0]["start_prompt"] == "red fast up"  # the page starts with it (a toy config's)
        peer.until(lambda: peer.frames)
        assert Image.open(io.BytesIO(peer.frames[0][1])).size == (96, 48)
    assert _model_threads_end()


def test_token_and_recording_names(pipe, tmp_path):
    app = create_app(pipe, ServeOptions(**SIZE, token="s3cret", record_dir=tmp_path))
    (tmp_path / "secret.txt").write_text("x")
    with TestClient(app) as c:
        assert c.get("/").status_code == 403 and c.get("/?token=nope").status_code == 403
        assert c.get("/?token=s3cret").status_code == 200
        with c.websocket_connect("/ws") as ws:
            assert json.loads(ws.receive_text())["message"] == "a valid ?token= is required"
        with c.websocket_connect("/ws?token=s3cret") as ws:
            assert json.loads(ws.receive_text())["type"] == "hello"
        for name in ["secret.txt", "..%2Fsecret.txt", "recording-20260101-000000-deadbeef.mp4"]:
            assert c.get(f"/recordings/{name}?token=s3cret").status_code == 404


def test_block_queue_drops_the_oldest_whole_block_unless_lossless():
    q = BlockQueue(2)
    for i in range(5):
        q.put(i)
    assert q.drops == 3 and [q.get(0), q.get(0), q.get(0)] == [3, 4, None]
    q.set_lossless(True)
    q.put("a")
    q.put("b")
    blocked = threading.Thread(target=q.put, args=("c",))
    blocked.start()
    time.sleep(0.2)
    assert blocked.is_alive() and len(q) == 2  # waits for room instead of dropping
    assert q.get(0) == "a"
    blocked.join(2)
    assert not blocked.is_alive() and q.drops == 3 and [q.get(0), q.get(0)] == ["b", "c"]


def test_cli_rejects_bad_input_with_one_line(capsys):
    from reward_forcing.serve.__main__ import main
    assert main(["--config_path", "configs/nope.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope.yaml" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["--port", "x"])
    assert exit_info.value.code == 2


def test_cli_taehv_flags_go_together(capsys):
    from reward_forcing.serve.__main__ import main
    tiny = str(REPO_ROOT / "configs" / "tiny.yaml")
    assert main(["--config_path", tiny, "--decoder", "taehv"]) == 2
    assert "--decoder taehv and --taehv_path FILE go together" in capsys.readouterr().err
    assert main(["--config_path", tiny, "--decoder", "taehv", "--taehv_path", "nope.pth"]) == 2
    assert "TAEHV weights nope.pth do not exist" in capsys.readouterr().err
