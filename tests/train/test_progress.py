"""Progress bars: tqdm on a terminal, a few plain lines in a log file or a pipe."""

import io

from tqdm.auto import tqdm

from reclora.crm import build_crm
from reclora.crm.features import CrmInputs
from reclora.crm.train import CrmTrainConfig, train_crm
from reclora.data import load_dataset
from reclora.progress import LineProgress, progress_bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_tqdm_a_file_gets_lines():
    assert isinstance(progress_bar(range(3), file=Terminal()), tqdm)
    log = io.StringIO()
    bar = progress_bar(range(1000), desc="work", file=log)
    assert isinstance(bar, LineProgress)
    for _ in bar:
        bar.set_postfix(loss="0.5")
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 10
    assert lines[0].startswith("work:  10%") and "100/1000" in lines[0] and "loss=0.5" in lines[0]
    assert lines[-1].startswith("work: 100%") and "1000/1000" in lines[-1]


def test_a_bar_left_early_or_resumed_writes_where_it_stopped():
    log = io.StringIO()
    with progress_bar(total=50, initial=20, desc="steps", unit="step", file=log) as bar:
        bar.update(3)
    (line,) = log.getvalue().splitlines()
    assert line.startswith("steps:  46%") and "23/50" in line
    quiet = io.StringIO()
    progress_bar(range(5), file=quiet, disable=True).close()
    assert quiet.getvalue() == ""


def test_a_crm_epoch_logged_to_a_file_takes_a_few_lines(tmp_path, capsys):
    dataset = load_dataset("synthetic", cache=False, progress=False, n_users=40, n_items=60, n_ratings=2000)
    inputs = CrmInputs(dataset, history_slots=6)
    model = build_crm("din", inputs, 8, 16, 6, "soft", 0.0)
    train_crm(model, inputs, CrmTrainConfig(epochs=1, batch_size=8, progress=True), log=lambda line: None)
    err = capsys.readouterr().err
    assert dataset.split_sizes["train"] // 8 > 100  # a bar of hundreds of steps
    assert "\r" not in err and len(err.splitlines()) <= 3 * 10 and "CRM epoch 1: 100%" in err
