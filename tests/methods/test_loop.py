"""The training loop: resumable steps, callbacks, checkpoints and the progress bar."""

from rftengine.methods.data_order import batch_indices
from rftengine.methods.loop import train_loop
from rftengine.methods.reward import RewardConfig
from rftengine.methods.train_state import TrainState


def test_train_loop_runs_resumable_steps_with_callback_checkpoints_and_bar(capsys, terminal):
    """Batches are drawn at the data position; the step counts once per run_step (also when
    run_step advanced it itself); checkpoints every save_every and at the end."""
    cfg = RewardConfig(batch_size=3, max_steps=4, save_every=3, seed=5)
    state = TrainState("reward")
    seen, calls, saved = [], [], []

    def run_step(idx):
        seen.append(idx)
        state.step += len(seen) % 2          # like ppo.step on odd calls: must not double count
        return {"loss": float(len(seen))}

    history = train_loop(state, cfg, 4, 7, run_step, callback=lambda s, m: calls.append((s, m["loss"])),
                         checkpoint_fn=lambda s: saved.append(s.step), progress=True, desc="toy loop",
                         postfix={"loss": "loss"})
    assert seen == [batch_indices(7, 3, 3 * i, 5) for i in range(4)]
    assert calls == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)] and history == [{"loss": x} for x in (1.0, 2.0, 3.0, 4.0)]
    assert saved == [3, 4] and (state.step, state.data_position) == (4, 12)
    assert "toy loop" in capsys.readouterr().err
    assert train_loop(state, cfg, 4, 7, run_step) == []          # nothing left to run
