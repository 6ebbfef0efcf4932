const { KeyAuthority, errorDetails } = require('./index.js');

async function main() {
  const target = process.env.KEY_AUTHORITY_TARGET || '127.0.0.1:50051';
  const client = new KeyAuthority(target, { adminToken: process.env.KEY_AUTHORITY_ADMIN_TOKEN });
  try {
    const issued = await client.issueKey({
      workspace_id: 'acme',
      name: 'billing worker',
      scopes: ['payments:write'],
      ttl: { seconds: 3600 },
    });
    // issued.secret is the whole key: shown once, store it now
    console.log('issued', issued.key.prefix);

    let answer = await client.verifyKey({
      key: issued.secret,
      required_scopes: ['payments:write'],
    });
    console.log('verify:', answer.code); // VERIFY_CODE_VALID

    const page = await client.listKeys({ workspace_id: 'acme', page_size: 10 });
    console.log('listed', page.keys.length, 'of', page.total_size);

    const rotated = await client.rotateKey({
      workspace_id: 'acme',
      key_id: issued.key.key_id,
      grace_period: { seconds: 0 }, // the old key ends now
    });
    answer = await client.verifyKey({ key: issued.secret });
    console.log('old key after rotate:', answer.code); // VERIFY_CODE_EXPIRED

    await client.revokeKey('acme', rotated.key.key_id);
    answer = await client.verifyKey({ key: rotated.secret });
    console.log('new key after revoke:', answer.code); // VERIFY_CODE_REVOKED

    try {
      await client.issueKey({ workspace_id: 'acme', name: '' }); // an empty name is refused
    } catch (error) {
      const details = errorDetails(error);
      // INVALID_ARGUMENT { field: 'name' }
      console.log('refused:', details.reason, details.metadata);
    }
  } finally {
    client.close();
  }
}

main().catch((error) => {
  console.error(error);
  process.exitCode = 1;
});
