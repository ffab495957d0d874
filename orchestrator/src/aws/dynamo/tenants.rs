//! The tenants table: tenant records, and a pointer item per GitLab project and per domain.
//!
//! - **`put_tenant`** reads the old tenant item, then writes in one `TransactWriteItems`: the
//!   tenant item (`attribute_not_exists(pk)` when creating, else conditional on the record it
//!   had, so a concurrent change cannot leave a pointer behind), a pointer per project and one
//!   for the domain (`attribute_not_exists(pk) OR tenant_id = :id`: a project and a domain
//!   belong to one tenant) and the deletion of pointers of projects and of a domain the tenant
//!   no longer has.
//!   A tenant taking a domain is also compared with the other tenants (a scan), since those
//!   written before domain pointers existed have none.
//! - **`tenant_by_project`**, **`tenant_by_domain`** read the pointer, then the tenant.
//! - **`remove_tenant`** deletes the tenant item (conditional on the record read) and its
//!   pointers that are still its own, in one transaction.
//! - **`tenants`** scans for `tenant#` items (a few hundred tenants at most) and sorts them by
//!   id.

use aws_sdk_dynamodb::types::{
    CancellationReason, Delete, Put, ReturnValuesOnConditionCheckFailure, TransactWriteItem,
};
use workflows::{Domain, Tenant, TenantId};

use super::{BACKEND, DynamoStore, Item, build_error, bytes_of, failed, n, num, s, text, utf8};
use crate::aws::sdk_error;
use crate::ports::Error;

impl DynamoStore {
    pub(super) async fn write_tenant(
        &self,
        tenant: &Tenant,
        create_only: bool,
        expected: Option<&Tenant>,
    ) -> Result<(), Error> {
        let id = tenant.id.as_str();
        let (infra, app) = (tenant.infra_project, tenant.app_project);
        if infra == app {
            return Err(Error::invalid(format!(
                "tenant {id}: the infra and app repositories must be different GitLab projects (both are {infra})"
            )));
        }
        let old = self.tenant_item(id).await?;
        if create_only && old.is_some() {
            return Err(Error::AlreadyExists(format!("tenant {id}")));
        }
        // The write below is conditional on the record read here, so this check holds.
        if let Some(read) = expected {
            let stored = old.as_ref().map(tenant_of).transpose()?;
            if stored.as_ref() != Some(read) {
                return Err(changed(id));
            }
        }
        let old_projects: Vec<u64> = old
            .as_ref()
            .map(|o| {
                ["infra_project", "app_project"]
                    .into_iter()
                    .filter_map(|a| num(o, a))
                    .collect()
            })
            .unwrap_or_default();
        // Tenants written before domains had pointer items have none: a tenant taking a domain
        // looks at the others too (a scan, as rare as tenant changes are).
        let old_record = old.as_ref().and_then(|o| tenant_of(o).ok());
        if old_record
            .as_ref()
            .is_none_or(|t| t.domain != tenant.domain)
        {
            let holder = self
                .read_tenants()
                .await?
                .into_iter()
                .find(|t| t.domain == tenant.domain && t.id != tenant.id);
            if let Some(holder) = holder {
                return Err(Error::AlreadyExists(format!(
                    "domain {} (of tenant {})",
                    tenant.domain, holder.id
                )));
            }
        }
        // A corrupt old record has no domain to free; its pointer stays until deleted by hand.
        let old_domain = old
            .as_ref()
            .and_then(|o| tenant_of(o).ok())
            .map(|t| t.domain)
            .filter(|d| *d != tenant.domain);
        let record = utf8(workflows::encode(tenant), &format!("tenant {id}"))?;
        let mut put = Put::builder()
            .table_name(&self.tenants)
            .item("pk", s(format!("tenant#{id}")))
            .item("record", s(record))
            .item("infra_project", n(infra))
            .item("app_project", n(app));
        put = match &old {
            None => put
                .condition_expression("attribute_not_exists(#pk)")
                .expression_attribute_names("#pk", "pk"),
            // Replace only what was read, so the pointers deleted below are still its own.
            Some(o) => put
                .condition_expression("#r = :r")
                .expression_attribute_names("#r", "record")
                .expression_attribute_values(":r", o.get("record").cloned().unwrap_or(s(""))),
        };
        let mut items = vec![
            TransactWriteItem::builder()
                .put(put.build().map_err(build_error)?)
                .build(),
        ];
        let pointers = [
            format!("project#{infra}"),
            format!("project#{app}"),
            format!("domain#{}", tenant.domain),
        ];
        for pk in &pointers {
            let pointer = Put::builder()
                .table_name(&self.tenants)
                .item("pk", s(pk))
                .item("tenant_id", s(id))
                .condition_expression("attribute_not_exists(#pk) OR #t = :id")
                .expression_attribute_names("#pk", "pk")
                .expression_attribute_names("#t", "tenant_id")
                .expression_attribute_values(":id", s(id))
                .return_values_on_condition_check_failure(
                    ReturnValuesOnConditionCheckFailure::AllOld,
                )
                .build()
                .map_err(build_error)?;
            items.push(TransactWriteItem::builder().put(pointer).build());
        }
        let freed = old_projects
            .iter()
            .filter(|p| **p != infra && **p != app)
            .map(|p| format!("project#{p}"))
            .chain(old_domain.map(|d| format!("domain#{d}")));
        for pk in freed {
            items.push(self.free_pointer(pk, id)?);
        }
        let reasons = match self
            .transact(&format!("tenant {id} (table {})", self.tenants), items)
            .await?
        {
            Ok(()) => return Ok(()),
            Err(reasons) => reasons,
        };
        if failed(&reasons, 0) {
            return Err(if create_only {
                Error::AlreadyExists(format!("tenant {id}"))
            } else {
                changed(id)
            });
        }
        let held = [
            format!("GitLab project {infra}"),
            format!("GitLab project {app}"),
            format!("domain {}", tenant.domain),
        ];
        for (i, what) in held.iter().enumerate().map(|(i, w)| (i + 1, w)) {
            if failed(&reasons, i) {
                let other = reasons
                    .get(i)
                    .and_then(CancellationReason::item)
                    .and_then(|o| text(o, "tenant_id"))
                    .unwrap_or("another tenant");
                return Err(Error::AlreadyExists(format!("{what} (of tenant {other})")));
            }
        }
        Err(Error::unavailable(
            BACKEND,
            format!(
                "a project pointer of tenant {id} changed while it was being written; try again"
            ),
        ))
    }

    /// Deletes the tenant item, conditional on the record `read`, and its project and domain
    /// pointers (those still its own), in one transaction.
    pub(super) async fn delete_tenant(&self, read: &Tenant) -> Result<(), Error> {
        let id = read.id.as_str();
        let Some(old) = self.tenant_item(id).await? else {
            return Ok(());
        };
        if tenant_of(&old).ok().as_ref() != Some(read) {
            return Err(changed(id));
        }
        let mut items = vec![
            TransactWriteItem::builder()
                .delete(
                    Delete::builder()
                        .table_name(&self.tenants)
                        .key("pk", s(format!("tenant#{id}")))
                        .condition_expression("#r = :r")
                        .expression_attribute_names("#r", "record")
                        .expression_attribute_values(
                            ":r",
                            old.get("record").cloned().unwrap_or(s("")),
                        )
                        .build()
                        .map_err(build_error)?,
                )
                .build(),
        ];
        for pk in [
            format!("project#{}", read.infra_project),
            format!("project#{}", read.app_project),
            format!("domain#{}", read.domain),
        ] {
            items.push(self.free_pointer(pk, id)?);
        }
        match self
            .transact(&format!("tenant {id} (table {})", self.tenants), items)
            .await?
        {
            Ok(()) => Ok(()),
            Err(_) => Err(changed(id)),
        }
    }

    /// The deletion of pointer item `pk`, if it is tenant `id`'s (or gone already).
    fn free_pointer(&self, pk: impl Into<String>, id: &str) -> Result<TransactWriteItem, Error> {
        let delete = Delete::builder()
            .table_name(&self.tenants)
            .key("pk", s(pk))
            .condition_expression("attribute_not_exists(#pk) OR #t = :id")
            .expression_attribute_names("#pk", "pk")
            .expression_attribute_names("#t", "tenant_id")
            .expression_attribute_values(":id", s(id))
            .build()
            .map_err(build_error)?;
        Ok(TransactWriteItem::builder().delete(delete).build())
    }

    pub(super) async fn read_tenant(&self, id: &TenantId) -> Result<Option<Tenant>, Error> {
        let item = self.tenant_item(id.as_str()).await?;
        item.map(|i| tenant_of(&i)).transpose()
    }

    pub(super) async fn read_tenant_by_project(
        &self,
        project: u64,
    ) -> Result<Option<Tenant>, Error> {
        let tenant = self
            .tenant_by_pointer(
                &format!("project#{project}"),
                &format!("GitLab project {project}"),
            )
            .await?;
        // A pointer is only ever written with its tenant; check all the same.
        Ok(tenant.filter(|t| t.infra_project == project || t.app_project == project))
    }

    pub(super) async fn read_tenant_by_domain(
        &self,
        domain: &Domain,
    ) -> Result<Option<Tenant>, Error> {
        let tenant = self
            .tenant_by_pointer(&format!("domain#{domain}"), &format!("domain {domain}"))
            .await?;
        Ok(tenant.filter(|t| t.domain == *domain))
    }

    /// The tenant pointer item `pk` (`what`, for errors) names.
    async fn tenant_by_pointer(&self, pk: &str, what: &str) -> Result<Option<Tenant>, Error> {
        let pointer = self
            .get_item(&self.tenants, Item::from([("pk".to_owned(), s(pk))]), what)
            .await?;
        let Some(id) = pointer.as_ref().and_then(|p| text(p, "tenant_id")) else {
            return Ok(None);
        };
        let Some(item) = self.tenant_item(id).await? else {
            return Ok(None);
        };
        tenant_of(&item).map(Some)
    }

    pub(super) async fn read_tenants(&self) -> Result<Vec<Tenant>, Error> {
        let mut out = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let page = self
                .client
                .scan()
                .table_name(&self.tenants)
                .set_limit(self.page_size)
                .filter_expression("begins_with(#pk, :prefix)")
                .expression_attribute_names("#pk", "pk")
                .expression_attribute_values(":prefix", s("tenant#"))
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| sdk_error(BACKEND, "Scan", &format!("table {}", self.tenants), e))?;
            for item in page.items() {
                out.push(tenant_of(item)?);
            }
            match page.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
        Ok(out)
    }

    /// The stored tenant item of `id`.
    async fn tenant_item(&self, id: &str) -> Result<Option<Item>, Error> {
        self.get_item(
            &self.tenants,
            Item::from([("pk".to_owned(), s(format!("tenant#{id}")))]),
            &format!("tenant {id}"),
        )
        .await
    }
}

/// Tenant `id` changed since it was read: the retryable conflict of a concurrent change.
fn changed(id: &str) -> Error {
    Error::unavailable(
        BACKEND,
        format!(
            "tenant {id} changed since it was read (a concurrent change); read it again and retry"
        ),
    )
}

fn tenant_of(item: &Item) -> Result<Tenant, Error> {
    let pk = text(item, "pk").unwrap_or("a tenant item");
    let bytes = bytes_of(item, "record")
        .ok_or_else(|| Error::invalid(format!("{pk} has no record attribute")))?;
    workflows::decode(bytes).map_err(|source| Error::corrupt(format!("tenant record {pk}"), source))
}
