"""Default weight files: lookup folders, and the download path against a local HTTP server."""
import hashlib
import http.server
import socket
import threading
from pathlib import Path

import pytest

from blended_diffusion.models import weights as W

PAYLOAD = bytes(range(256)) * 4000  # 1 MB of known bytes
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class Server:
    """http.server on 127.0.0.1 in a thread, serving PAYLOAD at /file.pt with knobs:
    drop_after (close the connection after that many bytes of the first response, or of
    every response with drop_always), ranges (honour
    Range), corrupt (serve other bytes), status (answer every request with that code)."""

    def __init__(self, drop_after=None, ranges=True, corrupt=False, status=None, drop_always=False):
        self.drop_after, self.ranges, self.corrupt, self.status = drop_after, ranges, corrupt, status
        self.drop_always = drop_always
        self.requests: list[dict] = []
        srv = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                srv.requests.append({"path": self.path, "range": self.headers.get("Range")})
                if srv.status:
                    self.send_error(srv.status)
                    return
                data = bytes(255 - b for b in PAYLOAD) if srv.corrupt else PAYLOAD
                start = 0
                rng = self.headers.get("Range")
                if rng and srv.ranges:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if srv.drop_after is not None and (srv.drop_always or len(srv.requests) == 1):
                    self.wfile.write(body[:srv.drop_after])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/file.pt"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def weight(url, **kw):
    kw.setdefault("sha256", SHA)
    return W.WeightFile(name="file.pt", folder="ddpm", url=url, description="test file", **kw)


def leftovers(folder: Path):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_progress_checksum_and_atomic_rename(tmp_path, capsys):
    with Server() as s:
        out = W.download_file(s.url, tmp_path / "file.pt", weight=weight(s.url), backoff=0,
                              chunk_size=65536)
    assert out == tmp_path / "file.pt" and out.read_bytes() == PAYLOAD
    assert leftovers(tmp_path) == ["file.pt"]  # no .part left behind
    err = capsys.readouterr().err
    assert "file.pt" in err and "100%" in err  # the tqdm bar ran to the end


def test_prefix_suffix_checksum():
    w = weight("u", sha256="", sha256_prefix=SHA[:8], sha256_suffix=SHA[-5:])
    assert w.checksum_matches(SHA) and w.checksum_matches(SHA.upper())
    assert not w.checksum_matches(SHA[:8] + "0" * 51 + SHA[-5:][:-1] + "x")
    other_first = "1" if SHA[0] == "0" else "0"
    assert not w.checksum_matches(other_first + SHA[1:])
    assert not w.checksum_matches(SHA[:8] + SHA[-5:])  # a digest has 64 hex digits
    assert W.DDPM_256.checksum_matches(W.DDPM_256.sha256)
    assert W.DDPM_256.sha256.startswith("a37c32ff") and W.DDPM_256.sha256.endswith("c78b1")
    # OpenAI publishes the sha256 of its CLIP files as a URL component
    assert W.CLIP_VIT_B16.sha256 in W.CLIP_VIT_B16.url


def test_checksum_mismatch_rejected_and_cleaned_up(tmp_path):
    with Server(corrupt=True) as s:
        with pytest.raises(W.ChecksumError, match="sha256") as e:
            W.download_file(s.url, tmp_path / "file.pt", weight=weight(s.url), backoff=0)
    assert "file.pt" in str(e.value) and s.url in str(e.value)
    assert leftovers(tmp_path) == []  # neither the final name nor a .part


def test_resume_with_range_after_dropped_connection(tmp_path):
    with Server(drop_after=300_000) as s:
        out = W.download_file(s.url, tmp_path / "file.pt", weight=weight(s.url), backoff=0,
                              chunk_size=65536)
    assert out.read_bytes() == PAYLOAD
    assert len(s.requests) == 2
    assert s.requests[0]["range"] is None
    start = int(s.requests[1]["range"].split("=")[1].rstrip("-"))
    assert 0 < start <= 300_000  # resumed from what had arrived, not from 0
    assert leftovers(tmp_path) == ["file.pt"]


def test_retry_from_scratch_when_server_ignores_range(tmp_path):
    with Server(drop_after=300_000, ranges=False) as s:
        out = W.download_file(s.url, tmp_path / "file.pt", weight=weight(s.url), backoff=0)
    assert out.read_bytes() == PAYLOAD and len(s.requests) == 2


def test_resume_of_an_existing_partial_file(tmp_path):
    (tmp_path / "file.pt.part").write_bytes(PAYLOAD[:123_456])
    with Server() as s:
        out = W.download_file(s.url, tmp_path / "file.pt", weight=weight(s.url), backoff=0)
    assert out.read_bytes() == PAYLOAD and s.requests[0]["range"] == "bytes=123456-"


def test_gives_up_after_retries_and_never_uses_final_name(tmp_path):
    with Server(drop_after=1000, drop_always=True) as s:
        with pytest.raises(W.DownloadError, match="could not download file.pt"):
            W.download_file(s.url, tmp_path / "file.pt", weight=weight(s.url), retries=2, backoff=0)
        assert len(s.requests) == 3  # first try + 2 retries, each resuming
        assert [r["range"] for r in s.requests] == [None, "bytes=1000-", "bytes=2000-"]
    assert not (tmp_path / "file.pt").exists()
    assert (tmp_path / "file.pt.part").stat().st_size == 3000  # kept for the next run to resume


def test_http_error_is_not_retried(tmp_path):
    with Server(status=404) as s:
        with pytest.raises(W.DownloadError, match="HTTP 404"):
            W.download_file(s.url, tmp_path / "file.pt", weight=weight(s.url), retries=3, backoff=0)
        assert len(s.requests) == 1
    assert not (tmp_path / "file.pt").exists()


def closed_port_url():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}/diffusion/256x256_diffusion_uncond.pt"


def test_offline_error_names_url_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(W.ENV_MODELS_DIR, str(tmp_path / "models"))
    url = closed_port_url()
    w = W.WeightFile(name="256x256_diffusion_uncond.pt", folder="ddpm", url=url, description="x",
                     sha256=SHA)
    with pytest.raises(W.DownloadError) as e:
        W.ensure(w, progress=False, retries=1, backoff=0, pack_root=tmp_path / "pack")
    msg = str(e.value)
    folder = tmp_path / "models" / "ddpm"
    assert url in msg and "256x256_diffusion_uncond.pt" in msg and str(folder) in msg
    assert leftovers(folder) == []


def test_downloads_off_names_url_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(W.ENV_MODELS_DIR, str(tmp_path))
    with pytest.raises(W.WeightsError) as e:
        W.ensure("clip", download=False, pack_root=tmp_path / "pack")
    msg = str(e.value)
    assert W.CLIP_VIT_B16.url in msg and "ViT-B-16.pt" in msg and str(tmp_path / "clip_guidance") in msg


def test_lookup_env_cache_and_comfyui_tree(tmp_path, monkeypatch):
    monkeypatch.delenv(W.ENV_MODELS_DIR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    standalone = tmp_path / "somewhere" / "pack"
    standalone.mkdir(parents=True)
    assert W.search_dirs("ddpm", standalone) == [tmp_path / "xdg" / "blended_diffusion" / "ddpm"]

    comfy = tmp_path / "ComfyUI"
    pack = comfy / "custom_nodes" / "blended-diffusion"
    pack.mkdir(parents=True)
    (comfy / "models").mkdir()
    assert W.comfyui_models_dir(pack) == comfy / "models"
    dirs = W.search_dirs("clip_guidance", pack)
    assert dirs[0] == comfy / "models" / "clip_guidance"  # downloads go to ComfyUI's folder
    (comfy / "models" / "clip_guidance").mkdir()
    (comfy / "models" / "clip_guidance" / "ViT-B-16.pt").write_bytes(b"x")
    assert W.ensure("clip", download=False, pack_root=pack) == comfy / "models/clip_guidance/ViT-B-16.pt"

    monkeypatch.setenv(W.ENV_MODELS_DIR, str(tmp_path / "mine"))
    assert W.search_dirs("ddpm", pack)[0] == tmp_path / "mine" / "ddpm"
    with pytest.raises(ValueError, match="unknown weight folder"):
        W.search_dirs("checkpoints", pack)


def test_ensure_downloads_into_first_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(W.ENV_MODELS_DIR, str(tmp_path / "m"))
    with Server() as s:
        w = weight(s.url)
        p = W.ensure(w, progress=False, backoff=0, pack_root=tmp_path / "pack")
        assert p == tmp_path / "m" / "ddpm" / "file.pt" and p.read_bytes() == PAYLOAD
        assert W.ensure(w, progress=False, pack_root=tmp_path / "pack") == p  # found, no new request
        assert len(s.requests) == 1


UNRESOLVABLE = "weights.invalid"  # the .invalid top-level domain never resolves (RFC 2606)


def unresolvable_url(name="file.pt"):
    try:
        socket.getaddrinfo(UNRESOLVABLE, 80)
    except socket.gaierror:
        return f"http://{UNRESOLVABLE}/diffusion/{name}"
    pytest.skip(f"this machine's resolver answers for {UNRESOLVABLE}")


def test_unresolvable_host_fails_at_once_without_retries(tmp_path, caplog):
    """A host name that does not resolve (offline, DNS down, a typo) is not retried: a retry a few seconds
    later cannot succeed, so the error comes at once, naming the host, the URL and the folder."""
    url = unresolvable_url()
    with caplog.at_level("INFO", logger=W.__name__):
        with pytest.raises(W.DownloadError) as e:
            W.download_file(url, tmp_path / "file.pt", weight=weight(url), retries=3, backoff=0)
    assert "retry" not in caplog.text
    msg = str(e.value)
    assert f"the host {UNRESOLVABLE} cannot be resolved" in msg and url in msg and str(tmp_path) in msg
    assert leftovers(tmp_path) == []


def test_offline_switch_and_progress_report(tmp_path, monkeypatch):
    """Issue 13: BLENDED_DIFFUSION_OFFLINE=1 turns downloads off (error with URL and folder); ``report(got, total)``
    follows every chunk (the nodes show it as progress); a report that raises (Cancel) keeps the .part to resume."""
    monkeypatch.setenv(W.ENV_MODELS_DIR, str(tmp_path))
    monkeypatch.setenv(W.ENV_OFFLINE, "1")
    assert W.offline()
    with pytest.raises(W.WeightsError, match=W.ENV_OFFLINE) as e:
        W.ensure("ddpm_256", pack_root=tmp_path / "pack")
    assert W.DDPM_256.url in str(e.value) and str(tmp_path / "ddpm") in str(e.value)
    for off in ("0", "", "false"):
        monkeypatch.setenv(W.ENV_OFFLINE, off)
        assert not W.offline()
    seen = []
    with Server() as s:
        W.download_file(s.url, tmp_path / "a.pt", weight=weight(s.url), backoff=0, chunk_size=65536,
                        progress=False, report=lambda got, total: seen.append((got, total)))

        class Cancelled(Exception):
            pass

        def cancel(got, total):
            raise Cancelled

        with pytest.raises(Cancelled):
            W.download_file(s.url, tmp_path / "b.pt", weight=weight(s.url), backoff=0, chunk_size=65536,
                            progress=False, report=cancel)
    assert seen[-1] == (len(PAYLOAD), len(PAYLOAD)) and [g for g, _ in seen] == sorted(g for g, _ in seen)
    assert len(seen) > 1 and leftovers(tmp_path).count("b.pt.part") == 1 and "b.pt" not in leftovers(tmp_path)


def test_lpips_backbone_offline_error_and_one_command_fetch(tmp_path, monkeypatch, capsys):
    """Issue 13: a missing LPIPS backbone offline gives one error naming the file, the URL and the folder (the torch
    hub cache); `blended-diffusion weights --lpips` fetches it there (from a local server here), checked."""
    import dataclasses
    import hashlib

    from blended_diffusion import cli
    from blended_diffusion.models import guidance
    from local_http import serve
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(W.ENV_OFFLINE, "1")
    monkeypatch.delenv("BLENDED_DIFFUSION_LPIPS_RANDOM", raising=False)
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    assert W.torch_hub_checkpoints() == folder
    guidance._lpips_model.cache_clear()
    try:
        with pytest.raises(W.WeightsError) as e:
            guidance.lpips_model()
    finally:
        guidance._lpips_model.cache_clear()
    msg = str(e.value)
    assert W.LPIPS_VGG.name in msg and W.LPIPS_VGG.url in msg and str(folder) in msg and "weights --lpips" in msg
    assert cli.main(["weights", "--lpips"]) == 1                     # offline: the same message, exit code 1
    assert W.LPIPS_VGG.url in capsys.readouterr().err
    monkeypatch.delenv(W.ENV_OFFLINE)
    served = tmp_path / "served"
    served.mkdir()
    (served / W.LPIPS_VGG.name).write_bytes(PAYLOAD)
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    with serve(served) as url:
        fake = dataclasses.replace(W.LPIPS_VGG, url=url + W.LPIPS_VGG.name, sha256_prefix=digest[:8])
        monkeypatch.setitem(W.LPIPS_WEIGHTS, "vgg", fake)
        monkeypatch.setattr(W, "LPIPS_VGG", fake)
        assert cli.main(["weights", "--lpips"]) == 0
        assert (folder / W.LPIPS_VGG.name).read_bytes() == PAYLOAD and leftovers(folder) == [W.LPIPS_VGG.name]
        monkeypatch.setitem(W.LPIPS_WEIGHTS, "vgg", dataclasses.replace(fake, sha256_prefix="00000000"))
        (folder / W.LPIPS_VGG.name).unlink()
        with pytest.raises(W.ChecksumError):   # a file that is not torchvision's is refused
            W.ensure_lpips("vgg", progress=False)
    assert leftovers(folder) == []
