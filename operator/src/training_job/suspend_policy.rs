//! `runPolicy.suspend`: a suspended job has no pods and no start time; resuming starts a new
//! attempt from the last checkpoint, so no rank of the resumed gang meets one of the old.

use radfm_api::TrainingJobStatus;
use radfm_api::conditions::{self, ConditionType as C, reason};
use radfm_api::trainingjob::Phase;

use super::plan::{Pass, Plan};
use super::workers::Worker;

/// Deletes every worker and marks the job Suspended.
pub(super) fn suspend(
    pass: &Pass,
    plan: &mut Plan,
    st: &mut TrainingJobStatus,
    workers: &[Worker],
) {
    let live: Vec<&Worker> = workers.iter().collect();
    pass.remove(plan, &live);
    if workers.iter().any(|w| w.attempt == st.attempt) {
        st.attempt += 1;
    }
    let why = reason::SUSPENDED;
    if pass.set(
        st,
        C::Suspended,
        true,
        why,
        "runPolicy.suspend is true; workers deleted",
    ) {
        plan.normal(why, "job suspended; worker pods deleted");
    }
    pass.set(st, C::Running, false, why, "job is suspended");
    st.phase = Some(Phase::Suspended);
    st.start_time = None;
}

/// Clears Suspended once `runPolicy.suspend` went back to false (no-op otherwise).
pub(super) fn resume(pass: &Pass, plan: &mut Plan, st: &mut TrainingJobStatus) {
    if conditions::is_true(&st.conditions, C::Suspended) {
        let why = reason::RESUMED;
        pass.set(st, C::Suspended, false, why, "runPolicy.suspend is false");
        plan.normal(
            why,
            "job resumed; a new attempt starts from the last checkpoint",
        );
    }
}
