//! Connectors: how a planner decision becomes workers.
//!
//! * **virtual**: `pdx_sim`'s connector adds workers to a simulated pool (they serve after the
//!   pool's startup delay, in virtual time) and drains removed ones (no new requests; gone
//!   when idle).
//! * **local** ([`crate::live::LocalConnector`]): starts `pdx mock` processes that register
//!   themselves with `pdx serve` (`pdx mock --register URL --pool NAME`); scale-down drains a
//!   worker through the router (`DELETE /v1/workers`), waits until the router has nothing in
//!   flight on it and the worker holds no KV for a remote decode, then stops the process. Each
//!   decision's diversions go to the router (`PUT /v1/planner/diversions`).
//! * **Kubernetes**: implement [`Connector`] over the cluster's API. The mapping Dynamo's
//!   `KubernetesConnector` uses: one Deployment (or one service of a `DynamoGraphDeployment`)
//!   per pool; [`Connector::replicas`] reads its `spec.replicas`, [`Connector::scale`] patches
//!   the `scale` subresource. Scale-down must drain first, as the local connector does: give
//!   the pods a `preStop` hook that calls `DELETE /v1/workers` on `pdx serve` and waits until the
//!   worker is gone from `GET /v1/workers`, with `terminationGracePeriodSeconds` above the
//!   longest request. Readiness: the router only routes to a worker once it registered, which
//!   `pdx mock --register` (or the engine's sidecar) does when the engine serves. A connector
//!   must not block the planner: start the patch and return; the next interval sees the
//!   result through [`Connector::replicas`].

use crate::PlannerError;

/// Turns replica targets into running workers.
pub trait Connector {
    /// Replicas of `pool` that serve or are starting (draining ones excluded).
    fn replicas(&self, pool: &str) -> u32;

    /// Moves `pool` towards `target` replicas: starts new workers (serving after their
    /// startup), or drains and then stops surplus ones, starting ones first.
    ///
    /// Errors: [`PlannerError::Connector`] when a worker cannot be started or stopped, or the
    /// pool is unknown; the planner logs it and tries again at the next interval.
    fn scale(&mut self, pool: &str, target: u32) -> Result<(), PlannerError>;

    /// Hands the decision's diversions (all of them: the list replaces the previous one, empty
    /// clears) to whatever routes the requests. The default does nothing, for connectors whose
    /// router applies the diversions itself (`pdx sim`'s engine reads them from the decision).
    ///
    /// Errors: [`PlannerError::Connector`] when the router refuses them or cannot be reached; the
    /// planner logs it and sends them again at the next interval.
    fn divert(&mut self, diversions: &[crate::global::Diversion]) -> Result<(), PlannerError> {
        let _ = diversions;
        Ok(())
    }
}
