// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

/// @title HealthLab consent registry
/// @notice Owners register datasets by pointer and content hash, researchers request
///         access with machine-readable purpose codes and pay the fee into escrow,
///         owners approve or decline, grants expire or are revoked, and results are
///         anchored against the grant that allowed them. Only pointers, hashes, codes
///         and amounts are ever stored or logged: no health data, no purpose text.
/// @dev Access is keyed by (dataset, researcher): one open request or grant per pair,
///      which keeps `hasAccess` a single storage read and a request a single new slot.
///      Every request still gets a globally unique id, `datasetId << 40 | number`, where
///      `number` counts the dataset's requests (1, 2, ...; kept in the slot the request
///      writes anyway, so no request pays for a shared counter); calls that act on a
///      request name that id so an owner can never approve a different request than the
///      one they reviewed. What the researcher paid for is fixed by the request: the fee
///      and the grant's duration. A compute grant's fee goes to the owner when they
///      approve (paid to them in that call); a download grant's fee stays in escrow
///      until the owner releases the key, and comes back to the researcher if it is
///      not released within `requestTimeout` of the approval. Refunds and
///      auto-approved earnings are pull payments (`withdraw`).
contract HealthLabRegistry {
    // ------------------------------------------------------------------ use terms
    // Purpose / permission codes (GA4GH DUO-style). A dataset's terms list the purposes it
    // permits; a request's codes list the purposes it pursues.
    /// @notice DUO:0000042 general research use (permits every research purpose below).
    uint32 public constant GRU = 1 << 0;
    /// @notice DUO:0000006 health, medical or biomedical research (permits DS).
    uint32 public constant HMB = 1 << 1;
    /// @notice DUO:0000007 disease-specific research.
    uint32 public constant DS = 1 << 2;
    /// @notice DUO:0000011 population origins or ancestry research.
    uint32 public constant POA = 1 << 3;
    /// @notice DUO:0000020-like methods development (software, statistics, algorithms).
    uint32 public constant MDS = 1 << 4;
    /// @dev Mask of all purpose bits.
    uint32 internal constant PURPOSES = 0xFF;

    // Modifiers: on a dataset they are requirements, on a request they are attestations that
    // the requirement is met. A request must attest every requirement the dataset sets.
    /// @notice DUO:0000046 non-commercial use only / the requester's use is non-commercial.
    uint32 public constant NCU = 1 << 8;
    /// @notice DUO:0000021 ethics approval required / the requester holds ethics approval.
    uint32 public constant IRB = 1 << 9;
    /// @notice DUO:0000019 publication required / the requester will publish results.
    uint32 public constant PUB = 1 << 10;
    /// @dev Mask of attestable modifiers.
    uint32 internal constant ATTESTABLE = NCU | IRB | PUB;
    /// @notice DUO:0000020 collaboration required: always reviewed by the owner, never auto-approved.
    uint32 public constant COL = 1 << 11;
    /// @notice Download: on a dataset, researchers may download the (encrypted) content and
    ///         receive its key when approved; without it the dataset is compute-only (studies
    ///         run at the sites). On a request, the researcher asks for a download grant.
    uint32 public constant DL = 1 << 12;
    /// @notice All bits this contract understands; anything else is rejected.
    uint32 public constant KNOWN_CODES = GRU | HMB | DS | POA | MDS | NCU | IRB | PUB | COL | DL;

    // --------------------------------------------------------------------- types
    /// @notice Lifecycle of an access request. "Expired" is derived from `expiresAt`.
    enum Status {
        None,
        Pending,
        Approved,
        Declined,
        Cancelled,
        Revoked
    }

    /// @notice A registered dataset as `getDataset` returns it.
    /// @dev `pending`: requests waiting for a decision (at most `maxPending`).
    ///      `downloadsOpen`: download requests pending, and download grants whose key
    ///      has not been released; while any is open, `DL` stays in the terms.
    struct Dataset {
        address owner;
        uint88 fee;
        uint32 grantSeconds;
        uint32 terms;
        bool autoApprove;
        bool active;
        uint16 pending;
        uint16 maxPending;
        uint32 downloadsOpen;
        bytes32 contentHash;
        string pointer;
    }

    /// @dev A dataset as stored. Slot 0 holds what an owner's decision reads and writes
    ///      (owner, active, the pending count), and the request counter a request bumps
    ///      with the pending count: `approve` touches one slot of the dataset, a request
    ///      writes one. Slot 1 holds the terms a request reads. `requests`: how many
    ///      requests were made (the last request's number).
    struct DatasetSlots {
        address owner;
        bool active;
        uint16 pending;
        uint16 maxPending;
        uint40 requests;
        uint88 fee;
        uint32 grantSeconds;
        uint32 terms;
        bool autoApprove;
        uint32 downloadsOpen;
        bytes32 contentHash;
        string pointer;
    }

    /// @notice The current request or grant of one researcher on one dataset, as
    ///         `getAccess` returns it (`requestId` 0: none).
    /// @dev `grantSeconds`: the grant's duration as it stood when the researcher paid;
    ///      the grant, when approved, runs that long whatever the dataset says later.
    ///      `download`: the request asked for (and a grant allows) downloading the content.
    ///      `keyReleased`: the owner released a download grant's key (and was paid).
    struct Access {
        uint256 requestId;
        uint88 amount;
        uint32 createdAt;
        uint40 expiresAt;
        uint32 grantSeconds;
        Status status;
        bool download;
        bool keyReleased;
    }

    /// @dev An `Access` as stored (one slot): `number` is the request's number on its
    ///      dataset (0: none), its id `datasetId << 40 | number`.
    struct AccessSlot {
        uint40 number;
        uint88 amount;
        uint32 createdAt;
        uint40 expiresAt;
        uint32 grantSeconds;
        Status status;
        bool download;
        bool keyReleased;
    }

    /// @notice The public keys of the site that holds a dataset (three slots: two 32-byte
    ///         keys cannot share one). All zero until the owner binds them.
    /// @dev `maskKey`: the site's X25519 public key for the pairwise masks of secure sums.
    ///      `nodeKeyHash`: keccak256 of its Flower SuperNode's ECDSA P-384 public key, whose
    ///      97 bytes are only logged (`SiteKeysBound`). `boundAt`: when they were bound.
    struct SiteKeys {
        bytes32 maskKey;
        bytes32 nodeKeyHash;
        uint40 boundAt;
    }

    // ------------------------------------------------------------------- storage
    /// @notice Largest key envelope accepted by `releaseKey`, in bytes.
    uint256 public constant MAX_ENVELOPE = 512;

    /// @notice Largest sealed purpose a request may carry, in bytes.
    uint256 public constant MAX_SEALED_PURPOSE = 1024;

    /// @dev Length of an uncompressed SEC1 P-384 point: 0x04 || X (48 bytes) || Y (48 bytes).
    uint256 internal constant NODE_KEY_LENGTH = 97;

    /// @notice Seconds after which a researcher may cancel an unanswered request, and
    ///         take back the fee of a download grant whose key was not released.
    uint256 public immutable requestTimeout;

    /// @notice How long the owner may still release a key after the researcher asked for
    ///         the download's fee back (`requestDownloadRefund`).
    uint256 public constant REFUND_GRACE = 1 days;

    /// @notice When a researcher's asked-for download refund may complete (0: not asked).
    mapping(uint256 requestId => uint40) public refundableAt;

    /// @notice How many requests may wait for a decision on a dataset, until its owner
    ///         sets another cap (`setMaxPending`).
    uint16 public constant DEFAULT_MAX_PENDING = 64;

    /// @notice How many datasets were registered (the last dataset's id).
    uint64 public datasetCount;
    mapping(uint256 datasetId => DatasetSlots) internal _datasets;
    /// @notice The dataset an owner registered with a content hash (0: none). The same
    ///         content may be registered by several owners; each owner once.
    mapping(address owner => mapping(bytes32 contentHash => uint256 datasetId)) public datasetOf;
    mapping(uint256 datasetId => mapping(address researcher => AccessSlot)) internal _access;
    /// @notice Withdrawable balance of each payee (owners' earnings, researchers' refunds).
    mapping(address payee => uint256) public credits;
    /// @dev Anchored results, keyed by keccak256(requestId, resultHash) (request ids are
    ///      unique across datasets): only the request's researcher can anchor under it, so a copied digest can neither
    ///      block nor impersonate another researcher's anchor.
    mapping(bytes32 anchor => bool) internal _anchored;
    /// @dev The site keys each dataset's owner bound last (see `siteKeys`).
    mapping(uint256 datasetId => SiteKeys) internal _siteKeys;

    /// @notice A dataset's differential-privacy budget per researcher and grant (all zero:
    ///         none). `epsilonMilli`: ε × 1000; `deltaExponent`: δ = 10^-deltaExponent;
    ///         `noiseMilli`: the noise multiplier × 1000.
    struct PrivacyBudget {
        uint32 epsilonMilli;
        uint8 deltaExponent;
        uint32 noiseMilli;
    }

    /// @notice What a grant spent of its dataset's budget (the privacy ledger).
    struct PrivacySpend {
        uint32 answers;
        uint32 epsilonMilli;
    }

    mapping(uint256 datasetId => PrivacyBudget) public privacyBudget;
    mapping(uint256 requestId => PrivacySpend) public privacySpent;

    /// @dev Collaborations: lists of member owners, each kept by its curator.
    uint256 public collaborationCount;
    mapping(uint256 collaborationId => address) public collaborationCurator;
    mapping(uint256 collaborationId => mapping(address owner => bool)) public isMember;
    /// @notice keccak256 of the name a collaboration's curator gave a member (0: none).
    mapping(uint256 collaborationId => mapping(address member => bytes32)) public memberNameHash;

    bool private transient _entered;

    // -------------------------------------------------------------------- events
    event DatasetRegistered(
        uint256 indexed datasetId,
        address indexed owner,
        bytes32 indexed contentHash,
        string pointer,
        uint256 fee,
        uint32 grantSeconds,
        uint32 terms,
        bool autoApprove
    );
    event DatasetUpdated(
        uint256 indexed datasetId, uint256 fee, uint32 grantSeconds, uint32 terms, bool autoApprove, bool active
    );
    event AccessRequested(
        uint256 indexed requestId,
        uint256 indexed datasetId,
        address indexed researcher,
        uint32 codes,
        bytes32 purposeHash,
        uint256 amount
    );
    event AccessGranted(
        uint256 indexed requestId, uint256 indexed datasetId, address indexed researcher, uint40 expiresAt, bool automatic
    );
    event AccessDeclined(uint256 indexed requestId, uint256 indexed datasetId, address indexed researcher);
    event RequestCancelled(uint256 indexed requestId, uint256 indexed datasetId, address indexed researcher);
    event AccessRevoked(uint256 indexed requestId, uint256 indexed datasetId, address indexed researcher);
    event Withdrawal(address indexed payee, address indexed to, uint256 amount);
    /// @notice A fee paid straight to the owner (when they approve, or release a key).
    event FeePaid(uint256 indexed requestId, address indexed owner, uint256 amount);
    /// @notice A download grant whose key was not released in time ended; its fee was
    ///         credited back to the researcher.
    event DownloadRefunded(uint256 indexed requestId, uint256 indexed datasetId, address indexed researcher);
    event MaxPendingSet(uint256 indexed datasetId, uint16 maxPending);
    /// @notice A researcher asked for an undelivered download's fee back; the owner may
    ///         still release the key until `refundableAt`.
    event DownloadRefundRequested(
        uint256 indexed requestId, uint256 indexed datasetId, address indexed researcher, uint40 refundableAt
    );
    event ResultRecorded(
        uint256 indexed requestId, uint256 indexed datasetId, address indexed researcher, bytes32 resultHash
    );
    /// @notice The dataset's data key, encrypted (ECIES, secp256k1) to the researcher's
    ///         Ethereum public key: useless to anyone else. Kept only in this log.
    event KeyReleased(
        uint256 indexed requestId, uint256 indexed datasetId, address indexed researcher, bytes envelope
    );
    /// @notice The dataset's owner bound (or re-bound) its site's public keys. The full node
    ///         key is kept only in this log; check it against the stored `nodeKeyHash`.
    /// @notice A statistics query a researcher is about to ask: its hash and the datasets
    ///         it pools. Sites answer only logged queries, and audit every logged query
    ///         of the researcher, the ones they take no part in too.
    event QueryLogged(address indexed researcher, bytes32 indexed queryHash, uint256[] datasetIds);
    event PrivacyBudgetSet(uint256 indexed datasetId, uint32 epsilonMilli, uint8 deltaExponent, uint32 noiseMilli);
    event PrivacySpent(
        uint256 indexed requestId, uint256 indexed datasetId, uint32 answers, uint32 epsilonMilli
    );
    event CollaborationCreated(uint256 indexed collaborationId, address indexed curator, string name);
    event MemberSet(uint256 indexed collaborationId, address indexed member, bool isMember);
    event MemberNamed(uint256 indexed collaborationId, address indexed member, bytes32 nameHash, string name);
    event SiteKeysBound(uint256 indexed datasetId, bytes32 maskKey, bytes32 nodeKeyHash, bytes nodeKey);

    // -------------------------------------------------------------------- errors
    error UnknownDataset(uint256 datasetId);
    error UnknownRequest(uint256 requestId);
    error NotDatasetOwner(uint256 datasetId, address caller);
    error NotRequester(uint256 requestId, address caller);
    error EmptyPointer();
    error InvalidPointer();
    error ZeroContentHash();
    error ZeroPurposeHash();
    error DuplicateDataset(bytes32 contentHash, uint256 existingId);
    error InvalidGrantDuration(uint256 grantSeconds);
    error FeeTooLarge(uint256 fee);
    error UnknownCodes(uint32 codes);
    error NoPurpose();
    error PurposeNotPermitted(uint32 codes, uint32 terms);
    error DatasetInactive(uint256 datasetId);
    error FeeChanged(uint256 agreedFee, uint256 currentFee);
    error GrantDurationChanged(uint32 agreedSeconds, uint32 currentSeconds);
    error WrongPayment(uint256 expected, uint256 sent);
    error RequestAlreadyOpen(uint256 requestId);
    error AccessAlreadyGranted(uint256 requestId, uint40 expiresAt);
    error NotPending(uint256 requestId, Status status);
    error TooEarlyToCancel(uint256 requestId, uint256 cancellableAt);
    error NoActiveGrant(uint256 datasetId, address researcher);
    error NothingToWithdraw(address payee);
    error ZeroAddress();
    error PaymentFailed(address to, uint256 amount);
    error Reentrancy();
    error ResultAlreadyRecorded(bytes32 resultHash, uint256 requestId);
    error ZeroResultHash();
    error DownloadNotPermitted(uint256 datasetId);
    error NotADownloadGrant(uint256 requestId);
    error InvalidEnvelope(uint256 length);
    /// @notice A zero mask key, or a node key that is not a 97-byte uncompressed point
    ///         (0x04 || X || Y).
    error InvalidSiteKeys();
    error EmptyQuery();
    error TooManyDatasets(uint256 count);
    error UnknownCollaboration(uint256 collaborationId);
    error NotCurator(uint256 collaborationId, address caller);
    error EmptyName();
    error InvalidPrivacyBudget();
    error SpendDecreased(uint256 requestId);
    error TooManyPending(uint256 datasetId, uint16 maxPending);
    error InvalidMaxPending();
    error DownloadsOutstanding(uint256 datasetId, uint32 downloadsOpen);
    error NotAwaitingKey(uint256 requestId);
    error TooEarlyToRefund(uint256 requestId, uint256 refundableAt);
    error RefundNotRequested(uint256 requestId);
    error RefundAlreadyRequested(uint256 requestId, uint256 refundableAt);
    error DownloadNotSettled(uint256 requestId);

    // ----------------------------------------------------------------- modifiers
    modifier nonReentrant() {
        if (_entered) revert Reentrancy();
        _entered = true;
        _;
        _entered = false;
    }

    modifier onlyOwner(uint256 datasetId) {
        _checkOwner(datasetId);
        _;
    }

    /// @param requestTimeout_ seconds after which an unanswered request may be cancelled.
    constructor(uint256 requestTimeout_) {
        requestTimeout = requestTimeout_;
    }

    // ------------------------------------------------------------------ datasets
    /// @notice Register a dataset you hold.
    /// @param pointer where the (possibly encrypted) content lives: `https://…` or `ipfs://…`.
    /// @param contentHash sha256 of the content; one registration per owner and content
    ///        hash (another owner registering the same content does not block yours).
    /// @param fee wei a researcher pays per request (escrowed until a decision).
    /// @param grantSeconds how long an approved grant lasts.
    /// @param terms permitted purposes and requirements (see the code constants).
    /// @param autoApprove grant requests whose codes satisfy the terms in the same transaction.
    /// @return datasetId the new dataset's id (starting at 1).
    function registerDataset(
        string calldata pointer,
        bytes32 contentHash,
        uint256 fee,
        uint32 grantSeconds,
        uint32 terms,
        bool autoApprove
    ) external returns (uint256 datasetId) {
        _checkPointer(pointer);
        if (contentHash == bytes32(0)) revert ZeroContentHash();
        uint256 existing = datasetOf[msg.sender][contentHash];
        if (existing != 0) revert DuplicateDataset(contentHash, existing);
        _checkConfig(fee, grantSeconds, terms);
        uint64 id = ++datasetCount;
        datasetId = id;
        _datasets[id] = DatasetSlots({
            owner: msg.sender,
            active: true,
            pending: 0,
            maxPending: DEFAULT_MAX_PENDING,
            requests: 0,
            fee: uint88(fee),
            grantSeconds: grantSeconds,
            terms: terms,
            autoApprove: autoApprove,
            downloadsOpen: 0,
            contentHash: contentHash,
            pointer: pointer
        });
        datasetOf[msg.sender][contentHash] = datasetId;
        emit DatasetRegistered(datasetId, msg.sender, contentHash, pointer, fee, grantSeconds, terms, autoApprove);
    }

    /// @notice Change a dataset's fee, grant duration, terms and auto-approval at once.
    /// @dev Requests made before keep the fee and grant duration they paid for; new
    ///      requests must name the new fee. `DL` cannot leave the terms while download
    ///      requests or unreleased download grants are open (`DownloadsOutstanding`).
    function updateDataset(uint256 datasetId, uint256 fee, uint32 grantSeconds, uint32 terms, bool autoApprove)
        external
        onlyOwner(datasetId)
    {
        _checkConfig(fee, grantSeconds, terms);
        DatasetSlots storage d = _datasets[datasetId];
        uint32 open = d.downloadsOpen;
        if (terms & DL == 0 && open != 0) revert DownloadsOutstanding(datasetId, open);
        d.fee = uint88(fee);
        d.grantSeconds = grantSeconds;
        d.terms = terms;
        d.autoApprove = autoApprove;
        emit DatasetUpdated(datasetId, fee, grantSeconds, terms, autoApprove, d.active);
    }

    /// @notice Open or close a dataset. While inactive nobody has access, no request can be
    ///         made or approved, and researchers may cancel pending requests at once.
    function setActive(uint256 datasetId, bool active) external onlyOwner(datasetId) {
        DatasetSlots storage d = _datasets[datasetId];
        d.active = active;
        emit DatasetUpdated(datasetId, d.fee, d.grantSeconds, d.terms, d.autoApprove, active);
    }

    /// @notice Cap the requests that may wait for your decision on a dataset (at least 1);
    ///         a request over the cap reverts with `TooManyPending`. Decline or let
    ///         requests be cancelled to make room.
    function setMaxPending(uint256 datasetId, uint16 maxPending) external onlyOwner(datasetId) {
        if (maxPending == 0) revert InvalidMaxPending();
        _datasets[datasetId].maxPending = maxPending;
        emit MaxPendingSet(datasetId, maxPending);
    }

    // ----------------------------------------------------------------- site keys
    /// @notice Bind the public keys of the site that holds your dataset: its X25519 mask key
    ///         (pairwise masks of secure sums) and its Flower SuperNode's ECDSA P-384 key
    ///         (node authentication). Peers can check a site's keys against this binding, so a
    ///         server that substitutes them is caught. Binding again replaces both (rotation).
    /// @dev Stores the mask key, keccak256 of the node key and the time; the node key itself
    ///      is only logged (`SiteKeysBound`). Only public keys: private keys stay at the site.
    /// @param datasetId the dataset, which you must own.
    /// @param maskKey the raw 32-byte X25519 public key; not zero.
    /// @param nodeKey the node's public key as the 97-byte uncompressed SEC1 point 0x04 || X || Y.
    function bindSiteKeys(uint256 datasetId, bytes32 maskKey, bytes calldata nodeKey)
        external
        onlyOwner(datasetId)
    {
        if (maskKey == bytes32(0) || nodeKey.length != NODE_KEY_LENGTH || nodeKey[0] != bytes1(0x04)) {
            revert InvalidSiteKeys();
        }
        bytes32 nodeKeyHash = keccak256(nodeKey);
        _siteKeys[datasetId] = SiteKeys(maskKey, nodeKeyHash, uint40(block.timestamp));
        emit SiteKeysBound(datasetId, maskKey, nodeKeyHash, nodeKey);
    }

    // ------------------------------------------------------------------ requests
    /// @notice Ask for access to a dataset and pay its fee into escrow.
    /// @param datasetId the dataset.
    /// @param agreedFee the fee you saw; the call reverts with `FeeChanged` if it differs.
    /// @param agreedSeconds the grant duration you saw; the call reverts with
    ///        `GrantDurationChanged` if it differs. The grant, when approved, lasts this long.
    /// @param codes purposes pursued and requirements attested (see the code constants).
    /// @param purposeHash keccak256 of the free-text purpose; the text stays off chain in
    ///        clear.
    /// @param sealedPurpose the purpose text and its salt sealed to the owner's public key
    ///        (ECIES; up to `MAX_SEALED_PURPOSE` bytes, empty when the owner has no key,
    ///        e.g. a contract). Neither stored nor logged: the owner reads it from this
    ///        call's data in the researcher's signed transaction (which also proves who
    ///        sealed it) and checks it against `purposeHash`.
    /// @return requestId the new request's id; granted at once when the dataset auto-approves.
    function requestAccess(
        uint256 datasetId,
        uint256 agreedFee,
        uint32 agreedSeconds,
        uint32 codes,
        bytes32 purposeHash,
        bytes calldata sealedPurpose
    ) external payable returns (uint256 requestId) {
        if (sealedPurpose.length > MAX_SEALED_PURPOSE) revert InvalidEnvelope(sealedPurpose.length);
        DatasetSlots storage d = _datasets[datasetId];
        _checkRequest(d, datasetId, agreedFee, codes, purposeHash);
        if (agreedSeconds != d.grantSeconds) revert GrantDurationChanged(agreedSeconds, d.grantSeconds);
        requestId = _open(d, datasetId, codes, purposeHash);
    }

    /// @dev Store a checked request (or its automatic grant) and log it.
    function _open(DatasetSlots storage d, uint256 datasetId, uint32 codes, bytes32 purposeHash)
        internal
        returns (uint256 requestId)
    {
        AccessSlot storage a = _access[datasetId][msg.sender];
        Status status = a.status;
        if (status == Status.Pending) revert RequestAlreadyOpen(_requestId(datasetId, a.number));
        if (status == Status.Approved && block.timestamp < a.expiresAt) {
            revert AccessAlreadyGranted(_requestId(datasetId, a.number), a.expiresAt);
        }
        // an expired download whose key never came still holds its fee: settle it first
        if (_awaitingKey(a)) revert DownloadNotSettled(_requestId(datasetId, a.number));

        uint40 number = d.requests + 1; // checked: reverts rather than reuse a number
        d.requests = number;
        requestId = _requestId(datasetId, number);
        bool download = codes & DL != 0;
        uint256 fee = d.fee;
        uint40 expiresAt = 0; // a pending request has no expiry yet
        emit AccessRequested(requestId, datasetId, msg.sender, codes, purposeHash, fee);
        if (download) ++d.downloadsOpen;
        if (d.autoApprove && (d.terms & COL) == 0) {
            status = Status.Approved;
            expiresAt = uint40(block.timestamp + d.grantSeconds);
            // a download's fee waits in escrow for the key
            if (fee != 0 && !download) credits[d.owner] += fee;
            emit AccessGranted(requestId, datasetId, msg.sender, expiresAt, true);
        } else {
            status = Status.Pending;
            uint16 pending = d.pending;
            if (pending >= d.maxPending) revert TooManyPending(datasetId, d.maxPending);
            d.pending = pending + 1;
        }
        _access[datasetId][msg.sender] = AccessSlot(
            number, uint88(fee), uint32(block.timestamp), expiresAt, d.grantSeconds, status, download, false
        );
    }

    /// @notice Approve a pending request: a grant for the duration the researcher paid for,
    ///         from now. A compute grant's fee is paid to you in this call (credited to you
    ///         instead if your address rejects it); a download grant's fee stays in escrow
    ///         until you release the key (`releaseKey`).
    function approve(uint256 datasetId, address researcher, uint256 requestId)
        external
        onlyOwner(datasetId)
        nonReentrant
    {
        DatasetSlots storage d = _datasets[datasetId];
        if (!d.active) revert DatasetInactive(datasetId);
        AccessSlot storage a = _pending(datasetId, researcher, requestId);
        uint40 expiresAt = uint40(block.timestamp + a.grantSeconds);
        a.status = Status.Approved;
        a.expiresAt = expiresAt;
        --d.pending;
        emit AccessGranted(requestId, datasetId, researcher, expiresAt, false);
        uint256 amount = a.amount;
        if (amount != 0 && !a.download) _payOwner(requestId, amount);
    }

    /// @notice Decline a pending request; the escrowed fee becomes withdrawable by the researcher.
    function decline(uint256 datasetId, address researcher, uint256 requestId) external onlyOwner(datasetId) {
        AccessSlot storage a = _pending(datasetId, researcher, requestId);
        a.status = Status.Declined;
        _closeRequest(_datasets[datasetId], a);
        uint256 amount = a.amount;
        if (amount != 0) credits[researcher] += amount;
        emit AccessDeclined(requestId, datasetId, researcher);
    }

    /// @notice Cancel your own unanswered request after `requestTimeout` (at once if the
    ///         dataset was deactivated); the fee becomes withdrawable by you.
    function cancel(uint256 datasetId, uint256 requestId) external {
        AccessSlot storage a = _access[datasetId][msg.sender];
        if (!_is(datasetId, a, requestId)) revert NotRequester(requestId, msg.sender);
        if (a.status != Status.Pending) revert NotPending(requestId, a.status);
        uint256 cancellableAt = uint256(a.createdAt) + requestTimeout;
        if (block.timestamp < cancellableAt && _datasets[datasetId].active) {
            revert TooEarlyToCancel(requestId, cancellableAt);
        }
        a.status = Status.Cancelled;
        _closeRequest(_datasets[datasetId], a);
        uint256 amount = a.amount;
        if (amount != 0) credits[msg.sender] += amount;
        emit RequestCancelled(requestId, datasetId, msg.sender);
    }

    /// @notice Revoke a researcher's live grant at once. The fee already earned stays
    ///         earned; the fee of a download grant whose key you never released goes back
    ///         to the researcher.
    function revoke(uint256 datasetId, address researcher) external onlyOwner(datasetId) {
        AccessSlot storage a = _access[datasetId][researcher];
        if (a.status != Status.Approved || block.timestamp >= a.expiresAt) {
            revert NoActiveGrant(datasetId, researcher);
        }
        a.status = Status.Revoked;
        emit AccessRevoked(_requestId(datasetId, a.number), datasetId, researcher);
        if (a.download && !a.keyReleased) _refundDownload(datasetId, a, researcher);
    }

    /// @notice Ask for your download grant's fee back: its key was not released within
    ///         `requestTimeout` of the approval, or the grant is no longer live (expired, or
    ///         the dataset closed). The refund can be completed (`refundDownload`) after
    ///         `REFUND_GRACE`; until then the owner may still release the key, and is paid.
    ///         So a refund can never race a release: the researcher never holds both the
    ///         key and the fee.
    function requestDownloadRefund(uint256 datasetId, uint256 requestId) external {
        AccessSlot storage a = _access[datasetId][msg.sender];
        if (!_is(datasetId, a, requestId)) revert NotRequester(requestId, msg.sender);
        if (!_awaitingKey(a)) revert NotAwaitingKey(requestId);
        if (refundableAt[requestId] != 0) revert RefundAlreadyRequested(requestId, refundableAt[requestId]);
        uint256 askableAt = uint256(a.expiresAt) - a.grantSeconds + requestTimeout;
        if (block.timestamp < askableAt && _live(datasetId, a)) revert TooEarlyToRefund(requestId, askableAt);
        uint40 due = uint40(block.timestamp + REFUND_GRACE);
        refundableAt[requestId] = due;
        emit DownloadRefundRequested(requestId, datasetId, msg.sender, due);
    }

    /// @notice End a download grant whose key was not released, crediting its fee back
    ///         to the researcher: by the researcher once the grace after its
    ///         `requestDownloadRefund` has passed, by the owner at any time (giving up the
    ///         fee). The grant ends (`Cancelled`).
    function refundDownload(uint256 datasetId, address researcher, uint256 requestId) external {
        AccessSlot storage a = _access[datasetId][researcher];
        if (!_is(datasetId, a, requestId)) revert UnknownRequest(requestId);
        bool owner = _datasets[datasetId].owner == msg.sender;
        if (msg.sender != researcher && !owner) revert NotRequester(requestId, msg.sender);
        if (!_awaitingKey(a)) revert NotAwaitingKey(requestId);
        if (!owner) {
            uint256 due = refundableAt[requestId];
            if (due == 0) revert RefundNotRequested(requestId);
            if (block.timestamp < due) revert TooEarlyToRefund(requestId, due);
        }
        a.status = Status.Cancelled;
        _refundDownload(datasetId, a, researcher);
    }

    /// @notice Publish the dataset's data key for a researcher's download grant, encrypted
    ///         to that researcher's public key (see `KeyReleased`). Only the owner can. The
    ///         first release delivers what was paid for, so it is accepted while the grant
    ///         waits for its key — even once expired, its dataset closed, or a refund asked
    ///         for (until the refund completes) — and pays you the escrowed fee (credited
    ///         instead if your address rejects it). Later releases need a live grant. A
    ///         revoked or refunded grant, a compute-only grant or a dataset that no longer
    ///         allows downloads gets no envelope.
    /// @param requestId the grant's request id: an envelope is always for one grant.
    /// @param envelope the wrapped key (1 to `MAX_ENVELOPE` bytes); only logged, never stored.
    function releaseKey(uint256 datasetId, address researcher, uint256 requestId, bytes calldata envelope)
        external
        onlyOwner(datasetId)
        nonReentrant
    {
        if (envelope.length == 0 || envelope.length > MAX_ENVELOPE) revert InvalidEnvelope(envelope.length);
        AccessSlot storage a = _access[datasetId][researcher];
        if (!_is(datasetId, a, requestId)) revert UnknownRequest(requestId);
        if (!_awaitingKey(a) && !_live(datasetId, a)) revert NoActiveGrant(datasetId, researcher);
        if (!a.download) revert NotADownloadGrant(requestId);
        DatasetSlots storage d = _datasets[datasetId];
        if (d.terms & DL == 0) revert DownloadNotPermitted(datasetId);
        emit KeyReleased(requestId, datasetId, researcher, envelope);
        if (!a.keyReleased) {
            a.keyReleased = true;
            --d.downloadsOpen;
            uint256 amount = a.amount;
            if (amount != 0) _payOwner(requestId, amount);
        }
    }

    // ------------------------------------------------------------------ payments
    /// @notice Withdraw everything credited to you (earnings or refunds) to yourself.
    /// @return amount wei paid out.
    function withdraw() external returns (uint256 amount) {
        return _withdraw(payable(msg.sender));
    }

    /// @notice Withdraw everything credited to you to another address (for example when
    ///         your own address cannot receive ether).
    function withdrawTo(address payable to) external returns (uint256 amount) {
        if (to == address(0)) revert ZeroAddress();
        return _withdraw(to);
    }

    // ------------------------------------------------------------------- results
    /// @notice Anchor the hash of a result computed under your live grant. Anchors are
    ///         per request: another researcher recording the same hash under their own
    ///         grant neither blocks nor replaces yours.
    function recordResult(uint256 datasetId, uint256 requestId, bytes32 resultHash) external {
        if (resultHash == bytes32(0)) revert ZeroResultHash();
        AccessSlot storage a = _access[datasetId][msg.sender];
        if (!_is(datasetId, a, requestId)) revert NotRequester(requestId, msg.sender);
        if (!_live(datasetId, a)) revert NoActiveGrant(datasetId, msg.sender);
        bytes32 anchor = keccak256(abi.encode(requestId, resultHash));
        if (_anchored[anchor]) revert ResultAlreadyRecorded(resultHash, requestId);
        _anchored[anchor] = true;
        emit ResultRecorded(requestId, datasetId, msg.sender, resultHash);
    }

    /// @notice Whether `resultHash` was anchored under request `requestId` (by its researcher).
    function resultRecorded(uint256 requestId, bytes32 resultHash) external view returns (bool) {
        return _anchored[keccak256(abi.encode(requestId, resultHash))];
    }

    // --------------------------------------------------------- the shared query log
    /// @notice Log a statistics query before the sites answer it (one event per query).
    /// @param queryHash the hash of the query the researcher signs for the sites.
    /// @param datasetIds the datasets the query pools (at most 1,000, each registered).
    function logQuery(bytes32 queryHash, uint256[] calldata datasetIds) external {
        if (queryHash == bytes32(0) || datasetIds.length == 0) revert EmptyQuery();
        if (datasetIds.length > 1000) revert TooManyDatasets(datasetIds.length);
        for (uint256 i; i < datasetIds.length; ++i) {
            if (_datasets[datasetIds[i]].owner == address(0)) revert UnknownDataset(datasetIds[i]);
        }
        emit QueryLogged(msg.sender, queryHash, datasetIds);
    }

    // ------------------------------------------------------------ privacy budgets
    /// @notice Give a dataset a differential-privacy budget per researcher and grant, or
    ///         remove it (all zero). Its sites add noise and refuse once it is spent.
    function setPrivacyBudget(uint256 datasetId, uint32 epsilonMilli, uint8 deltaExponent, uint32 noiseMilli)
        external
        onlyOwner(datasetId)
    {
        bool none = epsilonMilli == 0 && deltaExponent == 0 && noiseMilli == 0;
        if (!none && (epsilonMilli == 0 || deltaExponent == 0 || deltaExponent > 30 || noiseMilli == 0)) {
            revert InvalidPrivacyBudget();
        }
        privacyBudget[datasetId] = PrivacyBudget(epsilonMilli, deltaExponent, noiseMilli);
        emit PrivacyBudgetSet(datasetId, epsilonMilli, deltaExponent, noiseMilli);
    }

    /// @notice Record what a grant has spent so far (its site's accountant's figures):
    ///         answers given and ε spent (× 1000). Only the dataset's owner; never less.
    function recordPrivacySpend(uint256 datasetId, address researcher, uint32 answers, uint32 epsilonMilli)
        external
        onlyOwner(datasetId)
    {
        uint40 number = _access[datasetId][researcher].number;
        if (number == 0) revert NoActiveGrant(datasetId, researcher);
        uint256 requestId = _requestId(datasetId, number);
        PrivacySpend storage spend = privacySpent[requestId];
        if (answers < spend.answers || epsilonMilli < spend.epsilonMilli) revert SpendDecreased(requestId);
        spend.answers = answers;
        spend.epsilonMilli = epsilonMilli;
        emit PrivacySpent(requestId, datasetId, answers, epsilonMilli);
    }

    // ------------------------------------------------------------ collaborations
    /// @notice Start a collaboration you curate: a list of member owners a site can
    ///         restrict its pooling to.
    /// @param name the collaboration's public name (e.g. a consortium's).
    function createCollaboration(string calldata name) external returns (uint256 collaborationId) {
        if (bytes(name).length == 0 || bytes(name).length > 200) revert EmptyName();
        collaborationId = ++collaborationCount;
        collaborationCurator[collaborationId] = msg.sender;
        emit CollaborationCreated(collaborationId, msg.sender, name);
    }

    /// @notice Add (`member_` true) or remove an owner from a collaboration (curator only).
    function setMember(uint256 collaborationId, address member, bool member_) external {
        address curator = collaborationCurator[collaborationId];
        if (curator == address(0)) revert UnknownCollaboration(collaborationId);
        if (curator != msg.sender) revert NotCurator(collaborationId, msg.sender);
        if (member == address(0)) revert ZeroAddress();
        isMember[collaborationId][member] = member_;
        emit MemberSet(collaborationId, member, member_);
    }

    /// @notice Name a member in words a researcher trusts (an institution's name), as
    ///         the collaboration's curator vouches for it: a collaboration used as an
    ///         owner directory. The name is logged (`MemberNamed`), its keccak256 stored,
    ///         so a node that alters the log is caught. Curator only; 1 to 200 bytes.
    function nameMember(uint256 collaborationId, address member, string calldata name) external {
        address curator = collaborationCurator[collaborationId];
        if (curator == address(0)) revert UnknownCollaboration(collaborationId);
        if (curator != msg.sender) revert NotCurator(collaborationId, msg.sender);
        if (member == address(0)) revert ZeroAddress();
        if (bytes(name).length == 0 || bytes(name).length > 200) revert EmptyName();
        bytes32 nameHash = keccak256(bytes(name));
        memberNameHash[collaborationId][member] = nameHash;
        emit MemberNamed(collaborationId, member, nameHash, name);
    }

    // --------------------------------------------------------------------- views
    /// @notice Whether `researcher` may use `datasetId` now: an approved, unexpired,
    ///         unrevoked grant on an active dataset.
    function hasAccess(uint256 datasetId, address researcher) external view returns (bool) {
        return _live(datasetId, _access[datasetId][researcher]);
    }

    /// @notice A dataset's full record.
    function getDataset(uint256 datasetId) external view returns (Dataset memory) {
        DatasetSlots storage d = _datasets[datasetId];
        if (d.owner == address(0)) revert UnknownDataset(datasetId);
        return Dataset({
            owner: d.owner,
            fee: d.fee,
            grantSeconds: d.grantSeconds,
            terms: d.terms,
            autoApprove: d.autoApprove,
            active: d.active,
            pending: d.pending,
            maxPending: d.maxPending,
            downloadsOpen: d.downloadsOpen,
            contentHash: d.contentHash,
            pointer: d.pointer
        });
    }

    /// @notice How many requests were made on `datasetId` (its last request's number;
    ///         0 for an unknown dataset). Request `n` of dataset `d` has id `d << 40 | n`.
    function requestCount(uint256 datasetId) external view returns (uint256) {
        return _datasets[datasetId].requests;
    }

    /// @notice The current request or grant of `researcher` on `datasetId` (zeroes if none).
    function getAccess(uint256 datasetId, address researcher) external view returns (Access memory) {
        AccessSlot storage a = _access[datasetId][researcher];
        uint40 number = a.number;
        return Access({
            requestId: number == 0 ? 0 : _requestId(datasetId, number),
            amount: a.amount,
            createdAt: a.createdAt,
            expiresAt: a.expiresAt,
            grantSeconds: a.grantSeconds,
            status: a.status,
            download: a.download,
            keyReleased: a.keyReleased
        });
    }

    /// @notice The public keys the owner of `datasetId` bound last (all zero if never bound).
    /// @return maskKey the site's X25519 public key.
    /// @return nodeKeyHash keccak256 of its SuperNode's P-384 key (the key is in `SiteKeysBound`).
    /// @return boundAt when they were bound.
    function siteKeys(uint256 datasetId)
        external
        view
        returns (bytes32 maskKey, bytes32 nodeKeyHash, uint40 boundAt)
    {
        SiteKeys storage k = _siteKeys[datasetId];
        return (k.maskKey, k.nodeKeyHash, k.boundAt);
    }

    /// @notice Whether a request carrying `codes` satisfies `terms`.
    function permits(uint32 codes, uint32 terms) external pure returns (bool) {
        return _permits(codes, terms);
    }

    // ------------------------------------------------------------------ internal
    function _withdraw(address payable to) internal nonReentrant returns (uint256 amount) {
        amount = credits[msg.sender];
        if (amount == 0) revert NothingToWithdraw(msg.sender);
        credits[msg.sender] = 0;
        emit Withdrawal(msg.sender, to, amount);
        (bool ok,) = to.call{value: amount}("");
        if (!ok) revert PaymentFailed(to, amount);
    }

    /// @dev Pay the caller (the dataset's owner, checked by the caller of this) a fee
    ///      straight away; an address that rejects ether is credited instead, so the owner
    ///      can never block their own decision. Callers are `nonReentrant`.
    function _payOwner(uint256 requestId, uint256 amount) internal {
        (bool ok,) = payable(msg.sender).call{value: amount}("");
        if (ok) {
            emit FeePaid(requestId, msg.sender, amount);
        } else {
            credits[msg.sender] += amount;
        }
    }

    /// @dev A pending request leaves the queue (declined or cancelled).
    function _closeRequest(DatasetSlots storage d, AccessSlot storage a) internal {
        --d.pending;
        if (a.download) --d.downloadsOpen;
    }

    /// @dev An unreleased download grant ends: its escrowed fee is credited back.
    function _refundDownload(uint256 datasetId, AccessSlot storage a, address researcher) internal {
        --_datasets[datasetId].downloadsOpen;
        uint256 amount = a.amount;
        if (amount != 0) credits[researcher] += amount;
        emit DownloadRefunded(_requestId(datasetId, a.number), datasetId, researcher);
    }

    /// @dev What a request must satisfy before anything is paid or stored.
    function _checkRequest(DatasetSlots storage d, uint256 datasetId, uint256 agreedFee, uint32 codes, bytes32 purposeHash)
        internal
        view
    {
        if (d.owner == address(0)) revert UnknownDataset(datasetId);
        if (!d.active) revert DatasetInactive(datasetId);
        uint256 fee = d.fee;
        if (agreedFee != fee) revert FeeChanged(agreedFee, fee);
        if (msg.value != fee) revert WrongPayment(fee, msg.value);
        if (purposeHash == bytes32(0)) revert ZeroPurposeHash();
        uint32 terms = d.terms;
        if (codes & DL != 0 && terms & DL == 0) revert DownloadNotPermitted(datasetId);
        if (!_permits(codes, terms)) revert PurposeNotPermitted(codes, terms);
    }

    function _pending(uint256 datasetId, address researcher, uint256 requestId)
        internal
        view
        returns (AccessSlot storage a)
    {
        a = _access[datasetId][researcher];
        if (!_is(datasetId, a, requestId)) revert UnknownRequest(requestId);
        if (a.status != Status.Pending) revert NotPending(requestId, a.status);
    }

    /// @dev A request's id: unique across datasets (`number` < 2^40, checked when counted).
    function _requestId(uint256 datasetId, uint40 number) internal pure returns (uint256) {
        return (datasetId << 40) | number;
    }

    /// @dev Whether `a` (of `datasetId`) is request `requestId`; never for an empty slot.
    function _is(uint256 datasetId, AccessSlot storage a, uint256 requestId) internal view returns (bool) {
        uint40 number = a.number;
        return number != 0 && _requestId(datasetId, number) == requestId;
    }

    /// @dev A download grant whose fee waits in escrow for its key (live or not).
    function _awaitingKey(AccessSlot storage a) internal view returns (bool) {
        return a.status == Status.Approved && a.download && !a.keyReleased;
    }

    function _live(uint256 datasetId, AccessSlot storage a) internal view returns (bool) {
        return a.status == Status.Approved && block.timestamp < a.expiresAt && _datasets[datasetId].active;
    }

    function _checkOwner(uint256 datasetId) internal view {
        address owner = _datasets[datasetId].owner;
        if (owner == address(0)) revert UnknownDataset(datasetId);
        if (owner != msg.sender) revert NotDatasetOwner(datasetId, msg.sender);
    }

    function _checkConfig(uint256 fee, uint32 grantSeconds, uint32 terms) internal pure {
        if (fee > type(uint88).max) revert FeeTooLarge(fee);
        if (grantSeconds == 0) revert InvalidGrantDuration(grantSeconds);
        if (terms & ~KNOWN_CODES != 0) revert UnknownCodes(terms);
        if (terms & PURPOSES == 0) revert NoPurpose();
    }

    function _checkPointer(string calldata pointer) internal pure {
        bytes calldata p = bytes(pointer);
        if (p.length == 0) revert EmptyPointer();
        if (p.length > 512) revert InvalidPointer();
        bool https = p.length > 8 && bytes8(p[:8]) == bytes8("https://");
        bool ipfs = p.length > 7 && bytes7(p[:7]) == bytes7("ipfs://");
        if (!https && !ipfs) revert InvalidPointer();
    }

    /// @dev DUO hierarchy: GRU permits every purpose, HMB permits DS. Every attestable
    ///      requirement of the terms must be attested by the codes. A download request
    ///      needs terms that allow downloads.
    function _permits(uint32 codes, uint32 terms) internal pure returns (bool) {
        if (codes & ~KNOWN_CODES != 0 || codes & COL != 0) return false;
        uint32 purposes = codes & PURPOSES;
        if (purposes == 0) return false;
        uint32 allowed = terms & PURPOSES;
        if (allowed & GRU != 0) allowed = PURPOSES;
        if (allowed & HMB != 0) allowed |= DS;
        if (purposes & ~allowed != 0) return false;
        if (codes & DL != 0 && terms & DL == 0) return false;
        uint32 required = terms & ATTESTABLE;
        return codes & required == required;
    }
}
