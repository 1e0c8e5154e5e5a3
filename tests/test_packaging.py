"""What a newcomer runs is what we test: README commands, .ci/run and the Dockerfile agree."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def setup_commands() -> list[str]:
    section = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for block in _bash_blocks(section) for line in block.splitlines() if line.strip()]


def test_readme_has_exactly_two_setup_commands_start_and_test():
    cmds = setup_commands()
    assert len(cmds) == 2, cmds
    start, test = cmds
    assert start.endswith("python app.py") and "requirements.txt" in start
    assert "pytest" in test and "requirements-dev.txt" in test


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text()
    assert setup_commands()[1] in ci.splitlines()


def test_dockerfile_installs_with_the_readme_command_and_serves_on_all_interfaces():
    docker = (ROOT / "Dockerfile").read_text()
    install = setup_commands()[0].removesuffix("&& python app.py").strip()
    assert install in " ".join(docker.split()), "Dockerfile must install with the README's command"
    assert "FROM nvidia/cuda" in docker
    assert re.search(r'ENTRYPOINT \["python3", "app.py", "--host", "0.0.0.0"\]', docker)
    assert "HEALTHCHECK" in docker and "EXPOSE 7860" in docker
    assert "/data" in docker and "huggingface" in docker and "KTO_STUDIO_HOME=/data" in docker
    assert "docker run --gpus all" in README and "docker build" in README


def test_requirements_pin_the_versions_known_to_work_together():
    req = (ROOT / "requirements.txt").read_text()
    assert "trl==1.15.0" in req and "transformers==5.17.0" in req and "datasets>=4.7,<5" in req
    assert "unsloth" not in [l.split("#")[0].strip() for l in req.splitlines()]  # optional accelerator only
