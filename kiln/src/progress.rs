//! Progress bars of `kiln run`: one per stage, drawn only on a terminal.
use std::collections::HashMap;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use kiln_executor::driver::Progress;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

pub struct ProgressBars {
    task: JoinHandle<()>,
}

impl ProgressBars {
    pub fn spawn(mut events: broadcast::Receiver<Progress>) -> Self {
        let task = tokio::spawn(async move {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{prefix:>9} {bar:30.cyan/blue} {pos:>4}/{len:<4} {msg}",
            )
            .expect("a valid template")
            .progress_chars("█▉▊▋▌▍▎▏ ");
            let mut bars: HashMap<u32, ProgressBar> = HashMap::new();
            loop {
                match events.recv().await {
                    Ok(Progress::StageSubmitted {
                        stage,
                        step,
                        description,
                        tasks,
                        ..
                    }) => {
                        // A replacement driver submits the stages again: one bar each.
                        let bar = bars
                            .entry(stage)
                            .or_insert_with(|| multi.add(ProgressBar::new(tasks as u64)));
                        bar.reset();
                        bar.set_length(tasks as u64);
                        bar.set_style(style.clone());
                        bar.set_prefix(format!("stage {stage}"));
                        bar.set_message(format!("{step}: {description}"));
                    }
                    Ok(Progress::TaskDone { stage, done, .. }) => {
                        if let Some(b) = bars.get(&stage) {
                            b.set_position(done as u64);
                        }
                    }
                    Ok(Progress::StageDone { stage }) => {
                        if let Some(b) = bars.get(&stage) {
                            b.set_position(b.length().unwrap_or(0));
                            b.finish();
                        }
                    }
                    Ok(Progress::ExecutorLost { executor, reason }) => {
                        let _ = multi.println(format!("executor {executor} lost ({reason})"));
                    }
                    Ok(Progress::ExecutorDraining { executor, outputs }) => {
                        let _ = multi.println(format!(
                            "executor {executor} given notice: draining, moving {outputs} outputs"
                        ));
                    }
                    Ok(Progress::StageResumed { stage }) => {
                        if let Some(b) = bars.get(&stage) {
                            b.set_position(b.length().unwrap_or(0));
                            b.finish_with_message(format!("{} (taken over)", b.message()));
                        }
                    }
                    Ok(Progress::ExecutorRegistered { .. }) => {}
                    Ok(Progress::Iteration {
                        step,
                        iteration,
                        of,
                    }) => {
                        let _ =
                            multi.println(format!("{step}: iteration {iteration} (at most {of})"));
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        Self { task }
    }

    /// Stops drawing.
    pub async fn finish(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}
