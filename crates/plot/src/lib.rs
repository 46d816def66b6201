//! A picture of a migration.
//!
//! A [`Timeline`] records a migration from the `query-migrate` snapshots a poller
//! reads anyway (the `ferry` progress line, a QMP client, a benchmark): remaining
//! bytes, throughput, the dirty rate by Ferry's rule and by QEMU's, the passes, the
//! convergence prediction and the downtime. [`render_svg`] draws it over time, so a
//! person sees at a glance why a migration did or did not converge: it converges
//! when throughput stays above the dirty rate and the remaining bytes fall to what
//! fits in the downtime limit.
//!
//! ```no_run
//! # fn poll() -> Option<serde_json::Value> { None }
//! let mut timeline = plot::Timeline::new();
//! while let Some(reply) = poll() {
//!     timeline.record_value(&reply)?;
//! }
//! plot::render_svg(&timeline, "my migration", std::path::Path::new("migration.svg"))?;
//! # Ok::<(), plot::Error>(())
//! ```

mod inspect;
mod render;
mod timeline;

pub use inspect::{inspect_svg, SvgInventory};

pub use render::{render_svg, render_svg_string, SeriesStyle, SERIES};
pub use timeline::{
    Convergence, DowntimePhasesUs, Outcome, Sample, Timeline, DEFAULT_PAGE_SIZE_BYTES,
};

/// Everything that can go wrong recording or drawing a timeline.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A snapshot is not `query-migrate`'s shape.
    #[error("not a query-migrate snapshot: {0}")]
    Snapshot(&'static str),
    /// A snapshot field has the wrong type.
    #[error("query-migrate snapshot: {0}")]
    Json(#[from] serde_json::Error),
    /// plotters could not draw.
    #[error("drawing the plot: {0}")]
    Draw(String),
    /// Writing the SVG file.
    #[error("writing {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}
