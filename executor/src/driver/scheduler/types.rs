//! The scheduler's vocabulary: tasks, stage states, how attempts fail, why a job stops, and
//! the events the scheduler answers with.
use kiln_api::LossReason;

/// An executor's id.
pub type ExecutorId = String;

/// One task: a partition of a stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId {
    /// Its stage.
    pub stage: u32,
    /// Its partition.
    pub partition: u32,
}

/// Where a stage is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StageStatus {
    /// Waiting for input stages.
    Unresolved,
    /// Inputs are complete; tasks may start.
    Resolved,
    /// Some tasks started.
    Running,
    /// Every partition's output is available.
    Succeeded,
}

/// How a task attempt failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskFailure {
    /// The task's own data or SQL is at fault: the job fails at once.
    Data(String),
    /// The executor or its environment: retried, up to `maxTaskAttempts`.
    Executor(String),
    /// An input block was missing at `executor`: its producer reruns, then this task.
    Fetch {
        executor: ExecutorId,
        stage: u32,
        map_partition: u32,
    },
}

/// Why a job cannot go on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobFailure {
    /// A task failed on its own data or SQL: retrying cannot help.
    Data {
        /// The task.
        task: TaskId,
        /// The task's error.
        message: String,
    },
    /// A task failed `maxTaskAttempts` times.
    TaskAttempts {
        /// The task.
        task: TaskId,
        /// Failed attempts.
        failures: u32,
        /// The budget.
        limit: u32,
        /// The last failure.
        last: String,
    },
    /// A stage was resubmitted more than `maxStageAttempts` times.
    StageAttempts {
        /// The stage.
        stage: u32,
        /// Its attempts.
        attempts: u32,
        /// The budget.
        limit: u32,
    },
    /// More executors were lost than `maxExecutorLosses` allows.
    ExecutorLosses {
        /// Executors lost.
        lost: u32,
        /// The budget.
        limit: u32,
        /// The last one lost.
        executor: ExecutorId,
        /// Why.
        reason: LossReason,
    },
}

impl JobFailure {
    /// Why the job failed, as the report, the status and metrics name it.
    pub fn reason(&self) -> kiln_api::FailureReason {
        use kiln_api::FailureReason as R;
        match self {
            JobFailure::Data { .. } => R::TaskDataError,
            JobFailure::TaskAttempts { .. } => R::TaskAttemptsExceeded,
            JobFailure::StageAttempts { .. } => R::StageAttemptsExceeded,
            JobFailure::ExecutorLosses { .. } => R::ExecutorLossesExceeded,
        }
    }
}

impl std::fmt::Display for JobFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobFailure::Data { task, message } => write!(
                f,
                "task {}.{} failed on its data: {message}",
                task.stage, task.partition
            ),
            JobFailure::TaskAttempts {
                task,
                failures,
                limit,
                last,
            } => write!(
                f,
                "task {}.{} failed {failures} times (failurePolicy.maxTaskAttempts = {limit}); last: {last}",
                task.stage, task.partition
            ),
            JobFailure::StageAttempts {
                stage,
                attempts,
                limit,
            } => write!(
                f,
                "stage {stage} had to be resubmitted {attempts} times (failurePolicy.maxStageAttempts = {limit})"
            ),
            JobFailure::ExecutorLosses {
                lost,
                limit,
                executor,
                reason,
            } => write!(
                f,
                "lost {lost} executors, more than failurePolicy.maxExecutorLosses = {limit} (last: {executor}, {})",
                reason.as_str()
            ),
        }
    }
}

/// One executor loss, as the scheduler saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loss {
    /// The executor.
    pub executor: ExecutorId,
    /// Why it went.
    pub reason: LossReason,
    /// Outputs it held that were still needed, now to be recomputed.
    pub outputs_lost: u64,
    /// Whether it counts against the budgets (see [`LossReason::counts_against_budget`]).
    pub counted: bool,
    /// Declared by its silence, its reason not yet settled by someone who sees its node.
    pub unsettled: bool,
}

/// What changed, for the driver to act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SchedulerEvent {
    /// A stage's inputs are complete (again); its plan must be (re)resolved.
    StageResolved(u32),
    /// All of a stage's outputs are available.
    StageSucceeded(u32),
    /// The job cannot go on.
    JobFailed(JobFailure),
}
