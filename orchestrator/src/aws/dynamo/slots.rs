//! Slots in the allocations table: leased slots that cap concurrent activities of a kind,
//! and the fair line of those waiting for one.
//!
//! One partition `slots#<kind>` per capped step kind: a counter item `count` (`held`, N), a
//! lease per holder `lease#<holder>` (`holder`, `tenant`, `since`, `expires`: unix ms), and per
//! waiter a place in line `line#<round, 4 digits>#<ticket, 20 digits>#<holder>` (with `wake`,
//! B: the message that resumes it) and a pointer `wait#<holder>` to it (`line`). Holders start
//! with their tenant, so `wait#<tenant>#` lists a tenant's waiters.
//!
//! - **`acquire_slot`** queries the leases (dropping lapsed ones: delete conditional on the
//!   `expires` read plus `ADD held -1`, one transaction), renews ours if there is one, else
//!   finds or joins its place (the pointer put is conditional, so a duplicate request joins
//!   once). Then it grants the free slots to the head of the line (a `Query` of at most that
//!   many places), each in one transaction: `ADD held 1` on the counter conditional on
//!   `held < cap`, the lease put, the place and pointer deleted. So the cap holds whatever
//!   workers race. A waiter is told how many are ahead (a `COUNT` query of at most a
//!   thousand).
//! - **`release_slot`** deletes the lease with `ADD held -1` (one transaction) and the place in
//!   line, if any, then grants what is free the same way.
//!
//! About four to eight requests a call.

use std::time::Duration;

use aws_sdk_dynamodb::types::{AttributeValue, Delete, Put, Select, TransactWriteItem, Update};
use aws_smithy_types::Blob;
use workflows::{TenantId, Timestamp, WorkflowKey};

use super::allocations::allocation_key;
use super::{BACKEND, DynamoStore, Item, build_error, clamp_i32, n, num, s, text};
use crate::aws::sdk_error;
use crate::ports::{Error, SlotEntry, SlotGrant, SlotsView, Woken};

impl DynamoStore {
    pub(super) async fn acquire_lease(
        &self,
        kind: &str,
        key: &WorkflowKey,
        holder: &str,
        cap: u32,
        ttl: Duration,
        wake: &[u8],
    ) -> Result<(SlotGrant, Woken), Error> {
        let pool = slot_pool(kind);
        let span = SlotSpan::new(&pool, cap, self.clock.now(), ttl);
        let (now, expires) = (span.now, span.expires);
        let tenant = key.tenant.as_str();

        let mut leases = self.live_leases(&span).await?;
        if let Some(mine) = leases.iter().find(|l| l.holder == holder) {
            let since = mine.since;
            if self
                .renew_slot_item(&pool, format!("lease#{holder}"), expires, None)
                .await?
            {
                let woken = self.promote(&span, leases.len()).await?;
                return Ok((
                    SlotGrant::Held {
                        since: Timestamp::from_unix_millis(since),
                    },
                    woken.into_iter().map(|(_, w)| w).collect(),
                ));
            }
            // Dropped meanwhile by another worker (it lapsed): ask like a newcomer.
            leases.retain(|l| l.holder != holder);
        }

        // Our place in line: the tenant's waiters share a prefix, so one query finds ours and
        // counts the tenant's others (for the round).
        let mut tenant_waiting = 0;
        let mut place = None;
        for item in self
            .slot_items(&pool, &format!("wait#{tenant}#"), None)
            .await?
        {
            let waiter = SlotItem::of(&item)?;
            if waiter.expires <= now {
                self.drop_waiter(&pool, &waiter).await?;
            } else if waiter.holder == holder {
                place = Some(waiter);
            } else {
                tenant_waiting += 1;
            }
        }
        let line = match place.and_then(|w| w.line) {
            Some(line) => {
                self.renew_slot_item(&pool, format!("wait#{holder}"), expires, None)
                    .await?;
                self.renew_slot_item(&pool, line.clone(), expires, Some(wake))
                    .await?;
                line
            }
            None => {
                let round = leases.iter().filter(|l| l.tenant == tenant).count() + tenant_waiting;
                let line = format!("line#{round:04}#{now:020}#{holder}");
                self.join_line(&pool, holder, tenant, &line, &span, wake)
                    .await?;
                line
            }
        };

        let mut woken = Vec::new();
        let mut mine = false;
        for (h, w) in self.promote(&span, leases.len()).await? {
            if h == holder {
                mine = true;
            } else {
                woken.push(w);
            }
        }
        let grant = if mine {
            SlotGrant::Held {
                since: Timestamp::from_unix_millis(now),
            }
        } else {
            SlotGrant::Waiting {
                ahead: self.count_ahead(&pool, &line).await?,
            }
        };
        Ok((grant, woken))
    }

    pub(super) async fn release_lease(
        &self,
        kind: &str,
        holder: &str,
        cap: u32,
        ttl: Duration,
    ) -> Result<Woken, Error> {
        let pool = slot_pool(kind);
        let span = SlotSpan::new(&pool, cap, self.clock.now(), ttl);
        let items = vec![
            TransactWriteItem::builder()
                .delete(
                    Delete::builder()
                        .table_name(&self.allocations)
                        .set_key(Some(allocation_key(&pool, format!("lease#{holder}"))))
                        .condition_expression("attribute_exists(#s)")
                        .expression_attribute_names("#s", "slot")
                        .build()
                        .map_err(build_error)?,
                )
                .build(),
            count_change(&self.allocations, &pool, -1, None)?,
        ];
        // Cancelled: it held no lease (perhaps it only waited).
        let _ = self
            .transact(&format!("lease of {holder} in {pool}"), items)
            .await?;
        let pointer = self
            .get_item(
                &self.allocations,
                allocation_key(&pool, format!("wait#{holder}")),
                &format!("place of {holder} in {pool}"),
            )
            .await?;
        if let Some(item) = pointer {
            self.drop_waiter(&pool, &SlotItem::of(&item)?).await?;
        }
        let held = self.live_leases(&span).await?.len();
        Ok(self
            .promote(&span, held)
            .await?
            .into_iter()
            .map(|(_, w)| w)
            .collect())
    }

    pub(super) async fn read_slots(&self, kind: &str) -> Result<SlotsView, Error> {
        let pool = slot_pool(kind);
        let now = self.clock.now().as_unix_millis();
        let entries = |items: Vec<Item>| -> Result<Vec<SlotEntry>, Error> {
            let mut out = Vec::new();
            for item in items {
                let e = SlotItem::of(&item)?;
                if e.expires > now {
                    out.push(SlotEntry {
                        holder: e.holder,
                        tenant: TenantId::new(e.tenant)
                            .map_err(|e| Error::invalid(format!("slot tenant: {e}")))?,
                        since: Timestamp::from_unix_millis(e.since),
                        expires_at: Timestamp::from_unix_millis(e.expires),
                    });
                }
            }
            Ok(out)
        };
        let mut held = entries(self.slot_items(&pool, "lease#", None).await?)?;
        held.sort_by(|a, b| (a.since, &a.holder).cmp(&(b.since, &b.holder)));
        Ok(SlotsView {
            held,
            waiting: entries(self.slot_items(&pool, "line#", None).await?)?,
        })
    }
}

/// A lease, a place in line, or its pointer, as stored.
struct SlotItem {
    holder: String,
    tenant: String,
    since: i64,
    expires: i64,
    /// The sort key of the place in line (pointers and line items).
    line: Option<String>,
    /// The message that resumes a waiter (line items).
    wake: Option<Vec<u8>>,
}

impl SlotItem {
    fn of(item: &Item) -> Result<Self, Error> {
        let field = |name: &str| {
            Error::invalid(format!(
                "a slot item has no {name}: {:?}",
                text(item, "slot")
            ))
        };
        Ok(Self {
            holder: text(item, "holder")
                .ok_or_else(|| field("holder"))?
                .to_owned(),
            tenant: text(item, "tenant")
                .ok_or_else(|| field("tenant"))?
                .to_owned(),
            since: num(item, "since").ok_or_else(|| field("since"))?,
            expires: num(item, "expires").ok_or_else(|| field("expires"))?,
            line: text(item, "line").map(str::to_owned),
            wake: item
                .get("wake")
                .and_then(|v| v.as_b().ok())
                .map(|b| b.as_ref().to_vec()),
        })
    }
}

/// The pool, cap and times of one slot request.
struct SlotSpan<'a> {
    pool: &'a str,
    cap: u32,
    now: i64,
    /// Of leases granted now.
    expires: i64,
}

impl<'a> SlotSpan<'a> {
    fn new(pool: &'a str, cap: u32, now: Timestamp, ttl: Duration) -> Self {
        let now = now.as_unix_millis();
        Self {
            pool,
            cap,
            now,
            expires: now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 4)),
        }
    }
}

fn slot_pool(kind: &str) -> String {
    format!("slots#{kind}")
}

/// `ADD held :delta` on the pool's counter item; with `cap`, only while it is under the cap.
fn count_change(
    table: &str,
    pool: &str,
    delta: i64,
    cap: Option<u32>,
) -> Result<TransactWriteItem, Error> {
    let mut update = Update::builder()
        .table_name(table)
        .set_key(Some(allocation_key(pool, "count".to_owned())))
        .update_expression("ADD #h :d")
        .expression_attribute_names("#h", "held")
        .expression_attribute_values(":d", n(delta));
    if let Some(cap) = cap {
        update = update
            .condition_expression("attribute_not_exists(#h) OR #h < :cap")
            .expression_attribute_values(":cap", n(cap));
    }
    Ok(TransactWriteItem::builder()
        .update(update.build().map_err(build_error)?)
        .build())
}

impl DynamoStore {
    /// The items of `pool` whose sort key starts with `prefix`, in order; with `first`, at
    /// most that many.
    async fn slot_items(
        &self,
        pool: &str,
        prefix: &str,
        first: Option<usize>,
    ) -> Result<Vec<Item>, Error> {
        let mut out = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let query = self
                .client
                .query()
                .table_name(&self.allocations)
                .expression_attribute_names("#p", "pool")
                .expression_attribute_names("#s", "slot")
                .expression_attribute_values(":p", s(pool))
                .expression_attribute_values(":lo", s(prefix))
                .consistent_read(true)
                .set_exclusive_start_key(start.take());
            let query = query.key_condition_expression("#p = :p AND begins_with(#s, :lo)");
            let query = match first {
                Some(limit) => query.limit(clamp_i32(limit - out.len())),
                None => query,
            };
            let page = query.send().await.map_err(|e| {
                sdk_error(
                    BACKEND,
                    "Query",
                    &format!("{prefix} items of {pool} in table {}", self.allocations),
                    e,
                )
            })?;
            out.extend(page.items().iter().cloned());
            if first.is_some_and(|limit| out.len() >= limit) {
                break;
            }
            match page.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => break,
            }
        }
        Ok(out)
    }

    /// The leases of the pool that have not lapsed; lapsed ones are dropped.
    async fn live_leases(&self, span: &SlotSpan<'_>) -> Result<Vec<SlotItem>, Error> {
        let mut leases = Vec::new();
        for item in self.slot_items(span.pool, "lease#", None).await? {
            let lease = SlotItem::of(&item)?;
            if lease.expires <= span.now {
                self.drop_lease(span.pool, &lease).await?;
            } else {
                leases.push(lease);
            }
        }
        Ok(leases)
    }

    /// Grants the slots free beside `held` leases to the head of the line; returns the
    /// holders granted and their wake messages.
    async fn promote(
        &self,
        span: &SlotSpan<'_>,
        held: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, Error> {
        let free = (span.cap as usize).saturating_sub(held);
        if free == 0 {
            return Ok(Vec::new());
        }
        let mut woken = Vec::new();
        for item in self.slot_items(span.pool, "line#", Some(free)).await? {
            let waiter = SlotItem::of(&item)?;
            if waiter.expires <= span.now {
                self.drop_waiter(span.pool, &waiter).await?;
                continue;
            }
            let line = waiter.line.clone().unwrap_or_default();
            if !self
                .grant(span, &waiter.holder, &waiter.tenant, &line)
                .await?
            {
                // The cap was reached meanwhile (another worker granted it).
                break;
            }
            woken.push((waiter.holder, waiter.wake.unwrap_or_default()));
        }
        Ok(woken)
    }

    /// Waiters before the place `line` (at most a thousand are counted).
    async fn count_ahead(&self, pool: &str, line: &str) -> Result<u64, Error> {
        let out = self
            .client
            .query()
            .table_name(&self.allocations)
            .key_condition_expression("#p = :p AND #s BETWEEN :lo AND :hi")
            .expression_attribute_names("#p", "pool")
            .expression_attribute_names("#s", "slot")
            .expression_attribute_values(":p", s(pool))
            .expression_attribute_values(":lo", s("line#"))
            .expression_attribute_values(":hi", s(line))
            .select(Select::Count)
            .limit(1001)
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| sdk_error(BACKEND, "Query", &format!("line of {pool}"), e))?;
        // The range includes our own place.
        Ok(u64::try_from(out.count).unwrap_or(0).saturating_sub(1))
    }

    /// Sets `expires` of an existing item; false when it is gone.
    async fn renew_slot_item(
        &self,
        pool: &str,
        slot: String,
        expires: i64,
        wake: Option<&[u8]>,
    ) -> Result<bool, Error> {
        let sent = self
            .client
            .update_item()
            .table_name(&self.allocations)
            .set_key(Some(allocation_key(pool, slot.clone())))
            .condition_expression("attribute_exists(#s)")
            .expression_attribute_names("#e", "expires")
            .expression_attribute_names("#s", "slot")
            .expression_attribute_values(":e", n(expires));
        let sent = match wake {
            Some(w) => sent
                .update_expression("SET #e = :e, #w = :w")
                .expression_attribute_names("#w", "wake")
                .expression_attribute_values(":w", AttributeValue::B(Blob::new(w.to_vec()))),
            None => sent.update_expression("SET #e = :e"),
        }
        .send()
        .await;
        match sent {
            Ok(_) => Ok(true),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Ok(false)
            }
            Err(e) => Err(sdk_error(
                BACKEND,
                "UpdateItem",
                &format!("{slot} of {pool}"),
                e,
            )),
        }
    }

    async fn join_line(
        &self,
        pool: &str,
        holder: &str,
        tenant: &str,
        line: &str,
        span: &SlotSpan<'_>,
        wake: &[u8],
    ) -> Result<(), Error> {
        let (now, expires) = (span.now, span.expires);
        let put = |slot: String| {
            let put = Put::builder();
            let put = if slot == line {
                put.item("wake", AttributeValue::B(Blob::new(wake.to_vec())))
            } else {
                put
            };
            put.table_name(&self.allocations)
                .item("pool", s(pool))
                .item("slot", s(slot))
                .item("holder", s(holder))
                .item("tenant", s(tenant))
                .item("line", s(line))
                .item("since", n(now))
                .item("expires", n(expires))
                // One place per holder: a second worker asking for it at the same moment
                // (a duplicate message) leaves it to the first.
                .condition_expression("attribute_not_exists(#s)")
                .expression_attribute_names("#s", "slot")
                .build()
                .map_err(build_error)
        };
        let items = vec![
            TransactWriteItem::builder()
                .put(put(format!("wait#{holder}"))?)
                .build(),
            TransactWriteItem::builder()
                .put(put(line.to_owned())?)
                .build(),
        ];
        let _ = self.transact(&format!("line of {pool}"), items).await?;
        Ok(())
    }

    /// Takes a slot for `holder`: counter under the cap, lease created, place in line left,
    /// in one transaction. False when the cap was reached meanwhile.
    async fn grant(
        &self,
        span: &SlotSpan<'_>,
        holder: &str,
        tenant: &str,
        line: &str,
    ) -> Result<bool, Error> {
        let (pool, cap, now, expires) = (span.pool, span.cap, span.now, span.expires);
        let delete = |slot: String| -> Result<TransactWriteItem, Error> {
            Ok(TransactWriteItem::builder()
                .delete(
                    Delete::builder()
                        .table_name(&self.allocations)
                        .set_key(Some(allocation_key(pool, slot)))
                        .build()
                        .map_err(build_error)?,
                )
                .build())
        };
        let items = vec![
            count_change(&self.allocations, pool, 1, Some(cap))?,
            TransactWriteItem::builder()
                .put(
                    Put::builder()
                        .table_name(&self.allocations)
                        .item("pool", s(pool))
                        .item("slot", s(format!("lease#{holder}")))
                        .item("holder", s(holder))
                        .item("tenant", s(tenant))
                        .item("since", n(now))
                        .item("expires", n(expires))
                        .condition_expression("attribute_not_exists(#s)")
                        .expression_attribute_names("#s", "slot")
                        .build()
                        .map_err(build_error)?,
                )
                .build(),
            delete(line.to_owned())?,
            delete(format!("wait#{holder}"))?,
        ];
        Ok(self
            .transact(&format!("slot of {holder} in {pool}"), items)
            .await?
            .is_ok())
    }

    /// Deletes a lapsed lease and gives its slot back, unless it was renewed meanwhile.
    async fn drop_lease(&self, pool: &str, lease: &SlotItem) -> Result<(), Error> {
        let items = vec![
            TransactWriteItem::builder()
                .delete(
                    Delete::builder()
                        .table_name(&self.allocations)
                        .set_key(Some(allocation_key(
                            pool,
                            format!("lease#{}", lease.holder),
                        )))
                        .condition_expression("#e = :e")
                        .expression_attribute_names("#e", "expires")
                        .expression_attribute_values(":e", n(lease.expires))
                        .build()
                        .map_err(build_error)?,
                )
                .build(),
            count_change(&self.allocations, pool, -1, None)?,
        ];
        let _ = self
            .transact(
                &format!("lapsed lease of {} in {pool}", lease.holder),
                items,
            )
            .await?;
        Ok(())
    }

    /// Deletes a place in line and its pointer (only if the pointer still points there).
    async fn drop_waiter(&self, pool: &str, waiter: &SlotItem) -> Result<(), Error> {
        let Some(line) = &waiter.line else {
            return Ok(());
        };
        for slot in [format!("wait#{}", waiter.holder), line.clone()] {
            let sent = self
                .client
                .delete_item()
                .table_name(&self.allocations)
                .set_key(Some(allocation_key(pool, slot.clone())))
                .condition_expression("attribute_not_exists(#l) OR #l = :l")
                .expression_attribute_names("#l", "line")
                .expression_attribute_values(":l", s(line))
                .send()
                .await;
            match sent {
                Ok(_) => {}
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|e| e.is_conditional_check_failed_exception()) => {}
                Err(e) => {
                    return Err(sdk_error(
                        BACKEND,
                        "DeleteItem",
                        &format!("{slot} of {pool}"),
                        e,
                    ));
                }
            }
        }
        Ok(())
    }
}
