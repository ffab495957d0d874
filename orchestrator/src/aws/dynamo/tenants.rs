//! The tenants table: tenant records and a pointer item per GitLab project.
//!
//! - **`put_tenant`** reads the old tenant item, then writes in one `TransactWriteItems`: the
//!   tenant item (`attribute_not_exists(pk)` when creating, else conditional on the projects it
//!   had, so a concurrent change cannot leave a pointer behind), a pointer per project
//!   (`attribute_not_exists(pk) OR tenant_id = :id`: a project belongs to one tenant) and the
//!   deletion of pointers of projects the tenant no longer has.
//! - **`tenant_by_project`** reads the pointer, then the tenant.
//! - **`tenants`** scans for `tenant#` items (a few hundred tenants at most) and sorts them by
//!   id.

use aws_sdk_dynamodb::types::{
    CancellationReason, Delete, Put, ReturnValuesOnConditionCheckFailure, TransactWriteItem,
};
use workflows::{Tenant, TenantId};

use super::{BACKEND, DynamoStore, Item, build_error, bytes_of, failed, n, num, s, text, utf8};
use crate::aws::sdk_error;
use crate::ports::Error;

impl DynamoStore {
    pub(super) async fn write_tenant(
        &self,
        tenant: &Tenant,
        create_only: bool,
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
        let old_projects: Vec<u64> = old
            .as_ref()
            .map(|o| {
                ["infra_project", "app_project"]
                    .into_iter()
                    .filter_map(|a| num(o, a))
                    .collect()
            })
            .unwrap_or_default();
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
                .condition_expression("#i = :i AND #a = :a")
                .expression_attribute_names("#i", "infra_project")
                .expression_attribute_names("#a", "app_project")
                .expression_attribute_values(":i", o.get("infra_project").cloned().unwrap_or(n(0)))
                .expression_attribute_values(":a", o.get("app_project").cloned().unwrap_or(n(0))),
        };
        let mut items = vec![
            TransactWriteItem::builder()
                .put(put.build().map_err(build_error)?)
                .build(),
        ];
        for project in [infra, app] {
            let pointer = Put::builder()
                .table_name(&self.tenants)
                .item("pk", s(format!("project#{project}")))
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
        for project in old_projects.iter().filter(|p| **p != infra && **p != app) {
            let delete = Delete::builder()
                .table_name(&self.tenants)
                .key("pk", s(format!("project#{project}")))
                .condition_expression("attribute_not_exists(#pk) OR #t = :id")
                .expression_attribute_names("#pk", "pk")
                .expression_attribute_names("#t", "tenant_id")
                .expression_attribute_values(":id", s(id))
                .build()
                .map_err(build_error)?;
            items.push(TransactWriteItem::builder().delete(delete).build());
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
                Error::unavailable(
                    BACKEND,
                    format!("tenant {id} changed while it was being written; try again"),
                )
            });
        }
        for (i, project) in [(1, infra), (2, app)] {
            if failed(&reasons, i) {
                let other = reasons
                    .get(i)
                    .and_then(CancellationReason::item)
                    .and_then(|o| text(o, "tenant_id"))
                    .unwrap_or("another tenant");
                return Err(Error::AlreadyExists(format!(
                    "GitLab project {project} (of tenant {other})"
                )));
            }
        }
        Err(Error::unavailable(
            BACKEND,
            format!(
                "a project pointer of tenant {id} changed while it was being written; try again"
            ),
        ))
    }

    pub(super) async fn read_tenant(&self, id: &TenantId) -> Result<Option<Tenant>, Error> {
        let item = self.tenant_item(id.as_str()).await?;
        item.map(|i| tenant_of(&i)).transpose()
    }

    pub(super) async fn read_tenant_by_project(
        &self,
        project: u64,
    ) -> Result<Option<Tenant>, Error> {
        let pointer = self
            .get_item(
                &self.tenants,
                Item::from([("pk".to_owned(), s(format!("project#{project}")))]),
                &format!("GitLab project {project}"),
            )
            .await?;
        let Some(id) = pointer.as_ref().and_then(|p| text(p, "tenant_id")) else {
            return Ok(None);
        };
        let Some(item) = self.tenant_item(id).await? else {
            return Ok(None);
        };
        let tenant = tenant_of(&item)?;
        // A pointer is only ever written with its tenant; check all the same.
        Ok((tenant.infra_project == project || tenant.app_project == project).then_some(tenant))
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

fn tenant_of(item: &Item) -> Result<Tenant, Error> {
    let pk = text(item, "pk").unwrap_or("a tenant item");
    let bytes = bytes_of(item, "record")
        .ok_or_else(|| Error::invalid(format!("{pk} has no record attribute")))?;
    workflows::decode(bytes).map_err(|source| Error::corrupt(format!("tenant record {pk}"), source))
}
