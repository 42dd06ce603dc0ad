//! Realistic response bodies for benchmarks and the bench harness: a CRM lookup with a list of
//! line items, scaled to a target size. Deterministic.

use serde_json::{json, Value};

/// A JSON body of about `bytes` bytes: `{"data": {"customer": ...}, "items": [...], "meta": ...}`.
pub(crate) fn crm_response(bytes: usize) -> Vec<u8> {
    let item = |i: usize| {
        json!({
            "id": format!("item_{i:06}"),
            "sku": format!("SKU-{:05}", (i * 7919) % 100_000),
            "name": format!("Dental care product number {i}"),
            "price": ((i * 37) % 500) as f64 + 0.99,
            "in_stock": i % 3 != 0,
            "tags": ["dental", if i % 2 == 0 { "hygiene" } else { "ortho" }],
            "dimensions": {"w": i % 30, "h": (i * 3) % 40, "unit": "cm"}
        })
    };
    let mut doc = json!({
        "data": {
            "customer": {
                "id": "cus_8f14e45f",
                "name": "Ada Lovelace",
                "tier": "gold",
                "phone": "+15551234567",
                "email": "ada@example.com",
                "address": {"line1": "12 Analytical Way", "city": "London", "zip": "N1 9GU"},
                "since": "2019-04-02T10:00:00Z"
            }
        },
        "items": [],
        "meta": {"total": 0, "page": 1, "request_id": "req_0f8fad5b"}
    });
    let base = doc.to_string().len();
    let per_item = item(0).to_string().len() + 1;
    let n = bytes.saturating_sub(base) / per_item;
    let items: Vec<Value> = (0..n.max(1)).map(item).collect();
    doc["meta"]["total"] = json!(items.len());
    doc["items"] = Value::Array(items);
    doc.to_string().into_bytes()
}

/// The simple-path queries the extraction benchmarks use.
pub(crate) const SIMPLE_QUERIES: &[(&str, &str)] = &[
    ("customer.name", "$.data.customer.name"),
    ("customer.tier", "$.data.customer.tier"),
    ("customer.zip", "$.data.customer.address.zip"),
    ("first_item", "$.items[0].id"),
    ("last_sku", "$.items[-1].sku"),
    ("total", "$.meta.total"),
];

/// A filter query.
pub(crate) const FILTER_QUERY: &str = "$.items[?@.price > 450].sku";
