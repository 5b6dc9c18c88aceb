// An independent Vault client, node-vault, against credbroker's Vault API:
// issue, renew, list, revoke, then the status of renewing the revoked
// lease. TestNodeVault runs it (VAULT_ADDR, VAULT_TOKEN; NODE_PATH finds
// node-vault) and checks its one line of JSON. Never prints the password.
const vault = require('node-vault')({ apiVersion: 'v1' }); // VAULT_ADDR, VAULT_TOKEN

(async () => {
  const s = await vault.read('database/creds/read_only');
  const renewed = await vault.renew({ lease_id: s.lease_id, increment: 120 });
  const list = await vault.list('sys/leases/lookup/database/creds/read_only/');
  await vault.revoke({ lease_id: s.lease_id });
  let renewAfterRevoke = 0;
  try {
    await vault.renew({ lease_id: s.lease_id, increment: 10 });
  } catch (e) {
    renewAfterRevoke = e.response ? e.response.statusCode : -1;
  }
  let wrongToken = 0;
  try {
    await require('node-vault')({ apiVersion: 'v1', token: 'wrong' }).read('database/creds/read_only');
  } catch (e) {
    wrongToken = e.response ? e.response.statusCode : -1;
  }
  console.log(JSON.stringify({
    lease_id: s.lease_id,
    lease_duration: s.lease_duration,
    renewable: s.renewable,
    username: s.data.username,
    has_password: typeof s.data.password === 'string' && s.data.password.length > 0,
    renewed_lease_duration: renewed.lease_duration,
    keys: list.data.keys,
    renew_after_revoke: renewAfterRevoke,
    wrong_token: wrongToken,
  }));
})().catch((e) => {
  console.error('node-vault: ' + e.message + (e.response ? ' (status ' + e.response.statusCode + ')' : ''));
  process.exit(1);
});
