//! What an SVG drawn by this crate contains, read back: for tests and tools that check
//! a plot has the series it should, without comparing pictures.

use crate::Error;

/// The parts of a plot that carry data: its texts and its polylines.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SvgInventory {
    /// Every text node, trimmed, in document order.
    pub texts: Vec<String>,
    /// (stroke colour upper-cased, point count) of every polyline, in document order.
    pub polylines: Vec<(String, usize)>,
}

/// Parses `svg` (which must be well-formed XML with an `svg` root) into its inventory.
pub fn inspect_svg(svg: &str) -> Result<SvgInventory, Error> {
    let doc = roxmltree::Document::parse(svg).map_err(|e| Error::Draw(e.to_string()))?;
    if doc.root_element().tag_name().name() != "svg" {
        return Err(Error::Draw(format!(
            "the root element is <{}>, not <svg>",
            doc.root_element().tag_name().name()
        )));
    }
    let texts = doc
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .map(|n| n.text().unwrap_or("").trim().to_owned())
        .collect();
    let polylines = doc
        .descendants()
        .filter(|n| n.has_tag_name("polyline"))
        .map(|n| {
            (
                n.attribute("stroke").unwrap_or("").to_uppercase(),
                n.attribute("points")
                    .unwrap_or("")
                    .split_whitespace()
                    .count(),
            )
        })
        .collect();
    Ok(SvgInventory { texts, polylines })
}
