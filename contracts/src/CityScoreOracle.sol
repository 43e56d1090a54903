// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

/// @title City health score oracle
/// @notice Anyone can ask for a city's aggregate citizen health score over a period of
///         days and pay the fee into escrow. The oracle registered by the owner - the
///         data holder's worker, which computes the score where the data lives, pooled
///         across sites under their disclosure rules - answers each request exactly
///         once: with the mean score (x100), the number of user-days and of sites behind
///         it, or with a refusal code and no number at all. A request nobody answers can
///         be cancelled by its requester after `requestTimeout`; payments are pull
///         payments (`withdraw`).
/// @dev Only aggregates are ever stored or logged: a city id, a period, a mean and two
///      counts. A fulfilled request's fee becomes the oracle's; a refused or cancelled
///      request's fee is refunded to its requester.
contract CityScoreOracle {
    // --------------------------------------------------------------------- types
    /// @notice Lifecycle of a score request.
    enum Status {
        None,
        Pending,
        Fulfilled,
        Refused,
        Cancelled
    }

    /// @notice Why the oracle answered without a number.
    /// @dev `None` is never a valid refusal: it is the value of every request that was
    ///      not refused.
    enum Refusal {
        None,
        /// A site's disclosure policy refused (too few user-days or users, differencing).
        DisclosureRefused,
        /// Fewer sites hold data for the city and period than a pooled result needs.
        TooFewSites,
        /// No site holds a scored user-day of the city in the period.
        NoData,
        /// No site knows the city at all.
        UnknownCity,
        /// A site's data could not be used (invalid or impossible values).
        DataRefused
    }

    /// @notice One request. Packed: slot 0 = requester + escrow, slot 1 = city,
    ///         slot 2 = period, time, status and the answer.
    struct Request {
        address requester;
        uint96 amount;
        bytes32 cityId;
        uint32 fromDay;
        uint32 toDay;
        uint40 createdAt;
        Status status;
        Refusal refusal;
        uint32 scoreX100;
        uint32 userDays;
        uint16 sites;
    }

    // ------------------------------------------------------------------- storage
    /// @notice Highest answerable score (100.00).
    uint32 public constant MAX_SCORE_X100 = 10_000;

    /// @notice Seconds after which a requester may cancel an unanswered request.
    uint256 public immutable requestTimeout;

    /// @notice Who registers the oracle and sets the fee.
    address public owner;
    /// @dev Shares the owner's slot: a request reads and bumps one slot.
    uint64 public requestCount;
    /// @notice The only address that may answer requests (zero until registered).
    address public oracle;
    /// @notice Wei a request must pay into escrow (zero: free).
    uint96 public fee;
    mapping(uint256 requestId => Request) internal _requests;
    /// @notice Withdrawable balance of each payee (the oracle's earnings, refunds).
    mapping(address payee => uint256) public credits;

    bool private transient _entered;

    // -------------------------------------------------------------------- events
    event OracleSet(address indexed previousOracle, address indexed oracle);
    event FeeSet(uint256 fee);
    event ScoreRequested(
        uint256 indexed requestId,
        address indexed requester,
        bytes32 indexed cityId,
        uint32 fromDay,
        uint32 toDay,
        uint256 amount
    );
    event ScoreFulfilled(
        uint256 indexed requestId, address indexed oracle, uint32 scoreX100, uint32 userDays, uint16 sites
    );
    event ScoreRefused(uint256 indexed requestId, address indexed oracle, Refusal reason);
    event RequestCancelled(uint256 indexed requestId, address indexed requester);
    event Withdrawal(address indexed payee, address indexed to, uint256 amount);

    // -------------------------------------------------------------------- errors
    error NotOwner(address caller);
    error NotOracle(address caller);
    error NotRequester(uint256 requestId, address caller);
    error UnknownRequest(uint256 requestId);
    error NotPending(uint256 requestId, Status status);
    error NoOracle();
    error ZeroAddress();
    error ZeroCity();
    error InvalidPeriod(uint32 fromDay, uint32 toDay);
    error InvalidTimeout(uint256 requestTimeout);
    error WrongPayment(uint256 expected, uint256 sent);
    error InvalidResult(uint32 scoreX100, uint32 userDays, uint16 sites);
    error InvalidRefusal();
    error TooEarlyToCancel(uint256 requestId, uint256 cancellableAt);
    error NothingToWithdraw(address payee);
    error PaymentFailed(address to, uint256 amount);
    error Reentrancy();

    // ----------------------------------------------------------------- modifiers
    modifier nonReentrant() {
        if (_entered) revert Reentrancy();
        _entered = true;
        _;
        _entered = false;
    }

    modifier onlyOwner() {
        if (msg.sender != owner) revert NotOwner(msg.sender);
        _;
    }

    /// @param requestTimeout_ seconds after which an unanswered request may be cancelled
    ///        (1 to 2**32 - 1).
    constructor(uint256 requestTimeout_) {
        if (requestTimeout_ == 0 || requestTimeout_ > type(uint32).max) revert InvalidTimeout(requestTimeout_);
        requestTimeout = requestTimeout_;
        owner = msg.sender;
    }

    // --------------------------------------------------------------------- admin
    /// @notice Register the address that answers requests (the data holder's worker).
    ///         Pending requests are answered by the new oracle.
    function setOracle(address newOracle) external onlyOwner {
        if (newOracle == address(0)) revert ZeroAddress();
        emit OracleSet(oracle, newOracle);
        oracle = newOracle;
    }

    /// @notice Set the fee of new requests; pending requests keep the fee they paid.
    function setFee(uint96 newFee) external onlyOwner {
        fee = newFee;
        emit FeeSet(newFee);
    }

    // ------------------------------------------------------------------ requests
    /// @notice Ask for the aggregate health score of `cityId` over days `fromDay` to
    ///         `toDay` (inclusive) and pay the fee into escrow.
    /// @param cityId the city's id: its short name, UTF-8, right-padded with zeros.
    /// @param fromDay first day of the period, in days since 1970-01-01 (UTC).
    /// @param toDay last day of the period (inclusive), at or after `fromDay`.
    /// @return requestId the new request's id (starting at 1).
    function requestScore(bytes32 cityId, uint32 fromDay, uint32 toDay) external payable returns (uint256 requestId) {
        if (oracle == address(0)) revert NoOracle();
        uint256 price = fee;
        if (msg.value != price) revert WrongPayment(price, msg.value);
        if (cityId == bytes32(0)) revert ZeroCity();
        if (toDay < fromDay) revert InvalidPeriod(fromDay, toDay);
        uint64 id = ++requestCount;
        requestId = id;
        _requests[id] = Request({
            requester: msg.sender,
            amount: uint96(price),
            cityId: cityId,
            fromDay: fromDay,
            toDay: toDay,
            createdAt: uint40(block.timestamp),
            status: Status.Pending,
            refusal: Refusal.None,
            scoreX100: 0,
            userDays: 0,
            sites: 0
        });
        emit ScoreRequested(id, msg.sender, cityId, fromDay, toDay, price);
    }

    /// @notice Answer a pending request with the pooled score (oracle only); the
    ///         escrowed fee becomes the oracle's.
    /// @param scoreX100 the mean score over the user-days, x100 and rounded (0 to 10000).
    /// @param userDays how many user-days the mean pools (at least 1).
    /// @param sites how many sites contributed (at least 1).
    function fulfil(uint256 requestId, uint32 scoreX100, uint32 userDays, uint16 sites) external {
        Request storage r = _answerable(requestId);
        if (scoreX100 > MAX_SCORE_X100 || userDays == 0 || sites == 0) {
            revert InvalidResult(scoreX100, userDays, sites);
        }
        r.status = Status.Fulfilled;
        r.scoreX100 = scoreX100;
        r.userDays = userDays;
        r.sites = sites;
        uint256 amount = r.amount;
        if (amount != 0) credits[msg.sender] += amount;
        emit ScoreFulfilled(requestId, msg.sender, scoreX100, userDays, sites);
    }

    /// @notice Answer a pending request with a refusal and no number (oracle only); the
    ///         escrowed fee is refunded to the requester.
    function refuse(uint256 requestId, Refusal reason) external {
        Request storage r = _answerable(requestId);
        if (reason == Refusal.None) revert InvalidRefusal();
        r.status = Status.Refused;
        r.refusal = reason;
        uint256 amount = r.amount;
        if (amount != 0) credits[r.requester] += amount;
        emit ScoreRefused(requestId, msg.sender, reason);
    }

    /// @notice Cancel your own unanswered request once `requestTimeout` has passed; the
    ///         fee becomes withdrawable by you.
    function cancel(uint256 requestId) external {
        Request storage r = _requests[requestId];
        address requester = r.requester;
        if (requester == address(0)) revert UnknownRequest(requestId);
        if (requester != msg.sender) revert NotRequester(requestId, msg.sender);
        if (r.status != Status.Pending) revert NotPending(requestId, r.status);
        uint256 cancellableAt = uint256(r.createdAt) + requestTimeout;
        if (block.timestamp < cancellableAt) revert TooEarlyToCancel(requestId, cancellableAt);
        r.status = Status.Cancelled;
        uint256 amount = r.amount;
        if (amount != 0) credits[msg.sender] += amount;
        emit RequestCancelled(requestId, msg.sender);
    }

    // ------------------------------------------------------------------ payments
    /// @notice Withdraw everything credited to you (earnings or refunds) to yourself.
    /// @return amount wei paid out.
    function withdraw() external returns (uint256 amount) {
        return _withdraw(payable(msg.sender));
    }

    /// @notice Withdraw everything credited to you to another address.
    function withdrawTo(address payable to) external returns (uint256 amount) {
        if (to == address(0)) revert ZeroAddress();
        return _withdraw(to);
    }

    // --------------------------------------------------------------------- views
    /// @notice A request's full record.
    function getRequest(uint256 requestId) external view returns (Request memory) {
        Request memory r = _requests[requestId];
        if (r.requester == address(0)) revert UnknownRequest(requestId);
        return r;
    }

    // ------------------------------------------------------------------ internal
    function _answerable(uint256 requestId) internal view returns (Request storage r) {
        if (msg.sender != oracle) revert NotOracle(msg.sender);
        r = _requests[requestId];
        if (r.requester == address(0)) revert UnknownRequest(requestId);
        if (r.status != Status.Pending) revert NotPending(requestId, r.status);
    }

    function _withdraw(address payable to) internal nonReentrant returns (uint256 amount) {
        amount = credits[msg.sender];
        if (amount == 0) revert NothingToWithdraw(msg.sender);
        credits[msg.sender] = 0;
        emit Withdrawal(msg.sender, to, amount);
        (bool ok,) = to.call{value: amount}("");
        if (!ok) revert PaymentFailed(to, amount);
    }
}
