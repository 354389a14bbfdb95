"""The loop's one budget over all its API stages (prefloop/budget.py, prefloop/loop.py), against the scripted
loopback server (tests/fake_server.py): generate and an llm judge on the openai backend. The stops come before any
training, so no model is needed; the arithmetic is tests/gen/test_budget.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from fake_server import FakeServer, Request, chat_answer

from prefloop.cli import main
from prefloop.gen import openai as oa

KEY_ENV = "PREFLOOP_TEST_BUDGET_KEY"
PROMPTS = [f"prompt {i}: " + "x" * (40 - len(f"prompt {i}: ")) for i in range(6)]  # 40 characters each


def judge_or_generate(req: Request):
    """Chat requests are the judge's ("Score: 1"); completions get the server's normal reply."""
    return chat_answer("Score: 1") if req.path.endswith("chat/completions") else None


def loop_config(tmp_path: Path, url: str) -> Path:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    config = {
        "out": str(tmp_path / "run"), "model": "m", "prompts": str(prompts), "rounds": 1,
        "gen": {"backend": "openai", "base_url": url, "api_key_env": KEY_ENV, "n": 2, "max_new_tokens": 16,
                "chunk_size": 2, "concurrency": 1, "ready_timeout": 5},
        "judge": {"judge": "llm", "judge_model": "j", "judge_backend": "openai", "base_url": url, "mode": "pointwise",
                  "api_key_env": KEY_ENV, "cache": "off", "judge_engine": {"concurrency": 1, "ready_timeout": 5}},
        "prices": {"m": {"input_per_mtok": 1000, "output_per_mtok": 100},
                   "j": {"input_per_mtok": 0, "output_per_mtok": 1000}},
        "max_budget_usd": 0.18,
    }
    path = tmp_path / "loop.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_loop_stops_at_its_budget_and_a_resume_counts_on_across_stages(tmp_path, monkeypatch, capsys):
    """$0.18: round 1's generate stops before its 3rd chunk (exit 2, phase `budget_exceeded`, the spend in the
    manifest). Re-run at $0.22: generate resumes and finishes (its own summary carries the first run's spend: before
    its 6th request it is <= $0.1712 + 0.0428 = $0.214), which takes the run past $0.22 (>= 6 x $0.041 = $0.246),
    so the judge, told what generate spent, stops before sending anything."""
    monkeypatch.setattr(oa, "BACKOFF_BASE", 0.01)
    monkeypatch.delenv(KEY_ENV, raising=False)
    with FakeServer() as server:
        server.script = judge_or_generate
        config = loop_config(tmp_path, server.url)
        assert main(["run", "--config", str(config)]) == 2
        [err] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prefloop ")]
        assert "generate: budget reached:" in err and "of max_budget_usd $0.18" in err
        manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
        assert manifest["status"] == "budget_exceeded"
        assert manifest["rounds"][1]["phases"]["generate"]["status"] == "budget_exceeded"
        replies = [r.reply.json["usage"] for r in server.generation_requests()]
        assert len(replies) == 4 and manifest["api_usage"]["prompt_tokens"] == 4 * 40
        assert manifest["api_usage"]["completion_tokens"] == sum(u["completion_tokens"] for u in replies)
        assert "budget_exceeded" in (tmp_path / "run" / "report.md").read_text()

        assert main(["run", "--config", str(config), "--max-budget-usd", "0.22"]) == 2
        [err] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prefloop ")]
        manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
        phases = manifest["rounds"][1]["phases"]
        replies = [r.reply.json["usage"] for r in server.generation_requests()]
        spent = sum(u["prompt_tokens"] * 1000 + u["completion_tokens"] * 100 for u in replies) / 1e6
        assert phases["generate"]["status"] == "done" and phases["judge"]["status"] == "budget_exceeded"
        assert phases["generate"]["summary"]["usage"]["requests"] == 6 and len(replies) == 6  # no judge request
        assert spent > 0.22 and manifest["api_usage"]["cost_usd"] == round(spent, 8)
        assert "judge: budget reached:" in err and "of it by the run's other stages" in err
        assert "of max_budget_usd $0.22;" in err
