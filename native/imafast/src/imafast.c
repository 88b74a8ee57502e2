/*
 * imafast: the native fast path of agent/attest/logs/ima.py (binary IMA measurement lists).
 *
 * The Python parser is the reference and the only place errors are worded. These functions
 * answer only when they are sure: anything they do not fully check (an unknown hash bank, a
 * malformed or out-of-bounds length, a template hash that does not match, more entries or
 * templates than the caller made room for) returns AG_NOT_HANDLED, and the caller runs the
 * Python code on the same bytes, which gives the result or the exact error.
 *
 * The list comes from the network, so the buffer is hostile: every length is compared with
 * the bytes that remain before it is used (as "size > remaining", never "at + size > end", so
 * nothing can wrap), and nothing is allocated from input lengths: the caller provides every
 * output array with its capacity. Bounds (entries, name and data sizes, fields, PCRs) come from
 * the caller, so ima.py stays their one home.
 *
 * Hashing is OpenSSL's (EVP): each algorithm fetched once, one EVP_MD_CTX per call.
 */
#include <openssl/evp.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define AG_EXPORT __attribute__((visibility("default")))
#define AG_NOT_HANDLED (-1)
/* Bumped when a signature or struct below changes; ima_native.py refuses any other. */
#define AG_ABI_VERSION 1

/* IMA_EVENT_NAME_LEN_MAX: the `ima` template's file name is hashed NUL-padded to 256 bytes
 * after the 20-byte digest (ima_calc_field_array_hash_tfm). */
#define IMA_NAME_PAD 256
#define IMA_DIGEST_SIZE 20
#define IMA_INPUT_SIZE (IMA_DIGEST_SIZE + IMA_NAME_PAD)
#define MAX_DIGEST 64

/* TPM_ALG_IDs (TCG Algorithm Registry), as agent/attest/tpm/algorithms.py names them. */
#define ALG_SHA1 0x0004
#define ALG_SHA256 0x000B
#define ALG_SHA384 0x000C
#define ALG_SHA512 0x000D

enum { KIND_FIELDS = 0, KIND_IMA = 1 };

/* One accepted entry. KIND_FIELDS: template data at data_at, data_size bytes. KIND_IMA: the
 * 20-byte digest at data_at, then u32 name length, then the name (data_size bytes, no NUL). */
struct ag_entry {
    uint32_t offset;
    uint32_t data_at;
    uint32_t data_size;
    uint8_t pcr;
    uint8_t kind;
    uint16_t template_index;
};
_Static_assert(sizeof(struct ag_entry) == 16, "ima_native.py reads entries as <IIIBBH");

/* One template name met (its first occurrence), with the field count of its entries;
 * varies = 1 when entries of that name had different counts. ima.py decides whether the
 * name allows that count (the template table lives there). */
struct ag_template {
    uint32_t name_at;
    uint32_t name_size;
    uint32_t field_count;
    uint32_t varies;
};
_Static_assert(sizeof(struct ag_template) == 16, "ima_native.py reads templates as <IIII");

struct ag_limits {
    uint32_t max_entries;
    uint32_t pcr_count;
    uint32_t max_name;
    uint32_t max_data;
    uint32_t max_fields;
    uint32_t max_ima_name;
};

/* What a scan found besides the entries: a bit per PCR extended, and violations. */
struct ag_summary {
    uint32_t pcr_mask;
    uint32_t violations;
    uint32_t template_count;
    uint32_t reserved;
};

struct algorithm {
    uint16_t id;
    const char *name;
    size_t size;
};

static const struct algorithm ALGORITHMS[] = {
    {ALG_SHA1, "SHA1", 20},
    {ALG_SHA256, "SHA2-256", 32},
    {ALG_SHA384, "SHA2-384", 48},
    {ALG_SHA512, "SHA2-512", 64},
};
#define ALGORITHM_COUNT (sizeof(ALGORITHMS) / sizeof(ALGORITHMS[0]))

static EVP_MD *fetched[ALGORITHM_COUNT];
static pthread_once_t fetch_once = PTHREAD_ONCE_INIT;

static void fetch_all(void)
{
    for (size_t i = 0; i < ALGORITHM_COUNT; i++)
        fetched[i] = EVP_MD_fetch(NULL, ALGORITHMS[i].name, NULL);
}

/* The algorithm with TPM_ALG_ID id, NULL for one not handled here (or not in this OpenSSL). */
static const EVP_MD *algorithm(int id, size_t *size)
{
    pthread_once(&fetch_once, fetch_all);
    for (size_t i = 0; i < ALGORITHM_COUNT; i++) {
        if (ALGORITHMS[i].id == id && fetched[i] != NULL &&
            (size_t)EVP_MD_get_size(fetched[i]) == ALGORITHMS[i].size) {
            *size = ALGORITHMS[i].size;
            return fetched[i];
        }
    }
    return NULL;
}

static uint32_t le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static int all_zero(const uint8_t *p, size_t size)
{
    uint8_t any = 0;
    for (size_t i = 0; i < size; i++)
        any |= p[i];
    return any == 0;
}

/* out = H(a || b); 1 on success. */
static int hash2(EVP_MD_CTX *ctx, const EVP_MD *md, const uint8_t *a, size_t a_size,
                 const uint8_t *b, size_t b_size, uint8_t *out)
{
    unsigned int written = 0;
    if (!EVP_DigestInit_ex2(ctx, md, NULL) || !EVP_DigestUpdate(ctx, a, a_size))
        return 0;
    if (b_size != 0 && !EVP_DigestUpdate(ctx, b, b_size))
        return 0;
    return EVP_DigestFinal_ex(ctx, out, &written) && written == (unsigned int)EVP_MD_get_size(md);
}

static int valid_name_byte(uint8_t c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
           c == '_' || c == '|' || c == '.' || c == '-';
}

/* What the kernel hashed for an entry the scan accepted: the template data, or for `ima` the
 * digest and the NUL-padded name built in scratch. Re-checks the entry against the buffer, so
 * a table that did not come from accelguard_ima_scan over this buffer cannot read past it. */
static int entry_input(const uint8_t *buf, size_t len, const struct ag_entry *entry,
                       uint8_t scratch[IMA_INPUT_SIZE], const uint8_t **input, size_t *size)
{
    if (entry->data_at > len)
        return 0;
    size_t remaining = len - entry->data_at;
    if (entry->kind == KIND_FIELDS) {
        if (entry->data_size > remaining)
            return 0;
        *input = buf + entry->data_at;
        *size = entry->data_size;
        return 1;
    }
    if (entry->kind != KIND_IMA || remaining < IMA_DIGEST_SIZE + 4 ||
        entry->data_size >= IMA_NAME_PAD || entry->data_size > remaining - IMA_DIGEST_SIZE - 4)
        return 0;
    memset(scratch, 0, IMA_INPUT_SIZE);
    memcpy(scratch, buf + entry->data_at, IMA_DIGEST_SIZE);
    memcpy(scratch + IMA_DIGEST_SIZE, buf + entry->data_at + IMA_DIGEST_SIZE + 4,
           entry->data_size);
    *input = scratch;
    *size = IMA_INPUT_SIZE;
    return 1;
}

/* The template hash of an entry (hash_size bytes at offset + 4), NULL if out of the buffer. */
static const uint8_t *entry_hash(const uint8_t *buf, size_t len, const struct ag_entry *entry,
                                 size_t hash_size)
{
    if (entry->offset > len || len - entry->offset < 4 + hash_size)
        return NULL;
    return buf + entry->offset + 4;
}

static int64_t find_template(const uint8_t *buf, const uint8_t *name, size_t name_size,
                             const struct ag_template *templates, size_t count)
{
    for (size_t i = 0; i < count; i++) {
        if (templates[i].name_size == name_size &&
            memcmp(buf + templates[i].name_at, name, name_size) == 0)
            return (int64_t)i;
    }
    return -1;
}

AG_EXPORT int accelguard_ima_abi(void)
{
    return AG_ABI_VERSION;
}

/*
 * Parse the binary list buf[0..len) whose template hashes are listed_alg's, checking each
 * non-violation entry's template hash when verify is set. Fills entries (capacity
 * entry_capacity), templates (capacity template_capacity) and summary; returns the number of
 * entries, or AG_NOT_HANDLED.
 */
AG_EXPORT int64_t accelguard_ima_scan(const uint8_t *buf, size_t len, int listed_alg, int verify,
                                      const struct ag_limits *limits, struct ag_entry *entries,
                                      size_t entry_capacity, struct ag_template *templates,
                                      size_t template_capacity, struct ag_summary *summary)
{
    size_t hash_size = 0;
    const EVP_MD *md = algorithm(listed_alg, &hash_size);
    /* Offsets are u32, PCRs a bit in a u32 mask, template indices u16, `ima` names padded to
     * IMA_NAME_PAD: bounds past those are not handled here. */
    if (md == NULL || buf == NULL || limits == NULL || entries == NULL || templates == NULL ||
        summary == NULL || len > UINT32_MAX || limits->pcr_count > 32 ||
        limits->max_ima_name >= IMA_NAME_PAD || template_capacity > UINT16_MAX + 1u)
        return AG_NOT_HANDLED;
    EVP_MD_CTX *ctx = NULL;
    if (verify && (ctx = EVP_MD_CTX_new()) == NULL)
        return AG_NOT_HANDLED;
    uint8_t scratch[IMA_INPUT_SIZE];
    uint8_t computed[MAX_DIGEST];
    size_t count = 0, template_count = 0, position = 0;
    int64_t result = AG_NOT_HANDLED;
    memset(summary, 0, sizeof(*summary));
    while (position < len) {
        if (count >= entry_capacity || count >= limits->max_entries)
            goto done;
        size_t remaining = len - position;
        if (remaining < 4 + hash_size + 4)
            goto done;
        uint32_t pcr = le32(buf + position);
        const uint8_t *template_hash = buf + position + 4;
        uint32_t name_size = le32(template_hash + hash_size);
        size_t name_at = position + 4 + hash_size + 4;
        if (pcr >= limits->pcr_count || name_size == 0 || name_size > limits->max_name ||
            name_size > len - name_at)
            goto done;
        const uint8_t *name = buf + name_at;
        int64_t found = find_template(buf, name, name_size, templates, template_count);
        if (found < 0) {
            if (template_count >= template_capacity)
                goto done;
            for (size_t i = 0; i < name_size; i++)
                if (!valid_name_byte(name[i]))
                    goto done;
        }
        struct ag_entry entry = {.offset = (uint32_t)position, .pcr = (uint8_t)pcr};
        size_t cursor = name_at + name_size;
        size_t next;
        uint32_t fields;
        if (name_size == 3 && memcmp(name, "ima", 3) == 0) {
            /* ima_measurements_show: no template data length, the digest without a length,
             * the file name with its strlen. */
            if (len - cursor < IMA_DIGEST_SIZE + 4)
                goto done;
            uint32_t file_name_size = le32(buf + cursor + IMA_DIGEST_SIZE);
            if (file_name_size > limits->max_ima_name ||
                file_name_size > len - cursor - IMA_DIGEST_SIZE - 4)
                goto done;
            entry.kind = KIND_IMA;
            entry.data_at = (uint32_t)cursor;
            entry.data_size = file_name_size;
            next = cursor + IMA_DIGEST_SIZE + 4 + file_name_size;
            fields = 2;
        } else {
            if (len - cursor < 4)
                goto done;
            uint32_t data_size = le32(buf + cursor);
            size_t data_at = cursor + 4;
            if (data_size > limits->max_data || data_size > len - data_at)
                goto done;
            size_t data_end = data_at + data_size;
            fields = 0;
            for (size_t field = data_at; field < data_end; fields++) {
                if (fields >= limits->max_fields || data_end - field < 4)
                    goto done;
                uint32_t field_size = le32(buf + field);
                if (field_size > data_end - field - 4)
                    goto done;
                field += 4 + (size_t)field_size;
            }
            entry.kind = KIND_FIELDS;
            entry.data_at = (uint32_t)data_at;
            entry.data_size = data_size;
            next = data_end;
        }
        if (all_zero(template_hash, hash_size)) {
            summary->violations++;
        } else if (verify) {
            const uint8_t *input;
            size_t input_size;
            if (!entry_input(buf, len, &entry, scratch, &input, &input_size) ||
                !hash2(ctx, md, input, input_size, NULL, 0, computed) ||
                memcmp(computed, template_hash, hash_size) != 0)
                goto done;
        }
        if (found < 0) {
            found = (int64_t)template_count++;
            templates[found] = (struct ag_template){
                .name_at = (uint32_t)name_at, .name_size = name_size, .field_count = fields};
        } else if (templates[found].field_count != fields) {
            templates[found].varies = 1;
        }
        entry.template_index = (uint16_t)found;
        entries[count++] = entry;
        summary->pcr_mask |= UINT32_C(1) << pcr;
        position = next;
    }
    summary->template_count = (uint32_t)template_count;
    result = (int64_t)count;
done:
    EVP_MD_CTX_free(ctx);
    return result;
}

/*
 * Replay PCR pcr in target_alg over entries[begin..count) of a table from accelguard_ima_scan
 * (template hashes listed in listed_alg), from and into value; the same rules as _fold in
 * agent/attest/logs/ima_log.py. With trace_values and trace_positions (capacity
 * count - begin each), records the value after each extend and the entry's position.
 * Returns the number of extends, or AG_NOT_HANDLED.
 */
AG_EXPORT int64_t accelguard_ima_replay(const uint8_t *buf, size_t len,
                                        const struct ag_entry *entries, size_t count,
                                        size_t begin, int listed_alg, int target_alg,
                                        uint32_t pcr, int legacy_padded_sha1, uint8_t *value,
                                        uint8_t *trace_values, uint32_t *trace_positions)
{
    size_t hash_size = 0, size = 0, sha1_size = 0;
    const EVP_MD *listed = algorithm(listed_alg, &hash_size);
    const EVP_MD *target = algorithm(target_alg, &size);
    const EVP_MD *sha1 = algorithm(ALG_SHA1, &sha1_size);
    if (listed == NULL || target == NULL || sha1 == NULL || buf == NULL || entries == NULL ||
        value == NULL || begin > count || count > UINT32_MAX ||
        (trace_values == NULL) != (trace_positions == NULL))
        return AG_NOT_HANDLED;
    int same_bank = listed_alg == target_alg;
    /* Kernels before 5.8 extended every bank with the SHA-1 template hash, zero-padded. */
    int padded = legacy_padded_sha1 && target_alg != ALG_SHA1 && !same_bank;
    uint8_t violation[MAX_DIGEST];
    memset(violation, 0xff, size);
    if (padded)
        memset(violation + sha1_size, 0, size - sha1_size);
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (ctx == NULL)
        return AG_NOT_HANDLED;
    uint8_t scratch[IMA_INPUT_SIZE];
    uint8_t digest[MAX_DIGEST];
    int64_t extends = 0, result = AG_NOT_HANDLED;
    for (size_t i = begin; i < count; i++) {
        const struct ag_entry *entry = &entries[i];
        if (entry->pcr != pcr)
            continue;
        const uint8_t *template_hash = entry_hash(buf, len, entry, hash_size);
        const uint8_t *extended = digest;
        const uint8_t *input;
        size_t input_size;
        if (template_hash == NULL)
            goto done;
        if (all_zero(template_hash, hash_size)) {
            extended = violation;
        } else if (same_bank) {
            extended = template_hash;
        } else if (padded) {
            memset(digest, 0, size);
            if (listed_alg == ALG_SHA1)
                memcpy(digest, template_hash, sha1_size);
            else if (!entry_input(buf, len, entry, scratch, &input, &input_size) ||
                     !hash2(ctx, sha1, input, input_size, NULL, 0, digest))
                goto done;
        } else if (!entry_input(buf, len, entry, scratch, &input, &input_size) ||
                   !hash2(ctx, target, input, input_size, NULL, 0, digest)) {
            goto done;
        }
        if (!hash2(ctx, target, value, size, extended, size, value))
            goto done;
        if (trace_values != NULL) {
            memcpy(trace_values + (size_t)extends * size, value, size);
            trace_positions[extends] = (uint32_t)i;
        }
        extends++;
    }
    result = extends;
done:
    EVP_MD_CTX_free(ctx);
    return result;
}

/*
 * The template-hash check of a table scanned without it: positions (and computed hashes,
 * hash-size bytes each) of the non-violation entries whose data does not hash to their listed
 * template hash, each array with room for count. Returns how many, or AG_NOT_HANDLED.
 */
AG_EXPORT int64_t accelguard_ima_mismatches(const uint8_t *buf, size_t len,
                                            const struct ag_entry *entries, size_t count,
                                            int listed_alg, uint32_t *positions,
                                            uint8_t *computed)
{
    size_t hash_size = 0;
    const EVP_MD *md = algorithm(listed_alg, &hash_size);
    if (md == NULL || buf == NULL || entries == NULL || positions == NULL || computed == NULL ||
        count > UINT32_MAX)
        return AG_NOT_HANDLED;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (ctx == NULL)
        return AG_NOT_HANDLED;
    uint8_t scratch[IMA_INPUT_SIZE];
    int64_t found = 0, result = AG_NOT_HANDLED;
    for (size_t i = 0; i < count; i++) {
        const uint8_t *template_hash = entry_hash(buf, len, &entries[i], hash_size);
        const uint8_t *input;
        size_t input_size;
        uint8_t *out = computed + (size_t)found * hash_size;
        if (template_hash == NULL)
            goto done;
        if (all_zero(template_hash, hash_size))
            continue;
        if (!entry_input(buf, len, &entries[i], scratch, &input, &input_size) ||
            !hash2(ctx, md, input, input_size, NULL, 0, out))
            goto done;
        if (memcmp(out, template_hash, hash_size) != 0)
            positions[found++] = (uint32_t)i;
    }
    result = found;
done:
    EVP_MD_CTX_free(ctx);
    return result;
}
